//! Every device's state for a snapshot, gathered in one place: the platform devices, then
//! each virtio device in attach order. A restored VM attaches the same devices in the same
//! order from its saved configuration, then takes this state back; a new device kind adds
//! its state here.

use serde::{Deserialize, Serialize};

use super::DeviceManager;
#[cfg(target_arch = "x86_64")]
use crate::devices::legacy::i8042::I8042State;
#[cfg(target_arch = "x86_64")]
use crate::devices::legacy::ioapic::IoapicState;
use crate::devices::legacy::serial::{SerialError, SerialSnapshot};
use crate::devices::virtio::mmio::MmioSnapshot;
use crate::devices::virtio::transport::TransportStateError;
use crate::vstate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    #[error("snapshots of a VM with a PCI bus (--enable-pci, VFIO) are not supported yet")]
    Pci,
    #[error("the VM has no console to save")]
    NoConsole,
    #[error("the snapshot holds {saved} virtio devices, the restored VM has {here}")]
    VirtioCount { saved: usize, here: usize },
    #[error("the snapshot's virtio device {index} is {saved}, the restored VM's is {here}")]
    VirtioLabel {
        index: usize,
        saved: String,
        here: String,
    },
    #[error("cannot restore {label}: {source}")]
    Transport {
        label: String,
        source: TransportStateError,
    },
    #[error("{0}")]
    Serial(#[from] SerialError),
    #[error("the snapshot's interrupt controllers do not match the VM's (I/O APIC {0})")]
    Ioapic(&'static str),
}

/// One virtio device: what logs call it (its kind and id), and its transport.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    pub label: String,
    pub mmio: MmioSnapshot,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialSnapshot,
    #[cfg(target_arch = "x86_64")]
    pub i8042: I8042State,
    /// ember's I/O APIC, with the split irqchip.
    #[cfg(target_arch = "x86_64")]
    pub ioapic: Option<IoapicState>,
    pub virtio: Vec<VirtioDeviceState>,
}

impl DeviceManager {
    /// Refuses what a snapshot cannot hold yet, before anything is written.
    pub fn check_snapshot_support(&self) -> Result<(), DeviceStateError> {
        #[cfg(target_arch = "x86_64")]
        if self.pci.is_some() {
            return Err(DeviceStateError::Pci);
        }
        Ok(())
    }

    /// Every device's state. The VM is paused and the devices quiesced.
    pub fn save_state(&self, vm: &Vm) -> Result<DevicesState, DeviceStateError> {
        self.check_snapshot_support()?;
        let legacy = self.legacy.as_ref().ok_or(DeviceStateError::NoConsole)?;
        let serial = legacy
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .save_state();
        #[cfg(not(target_arch = "x86_64"))]
        let _ = vm;
        let virtio = self
            .virtio
            .iter()
            .filter_map(|v| {
                v.mmio.as_ref().map(|t| VirtioDeviceState {
                    label: v.label.clone(),
                    mmio: t.lock().unwrap_or_else(|e| e.into_inner()).save_state(),
                })
            })
            .collect();
        Ok(DevicesState {
            serial,
            #[cfg(target_arch = "x86_64")]
            i8042: legacy
                .i8042
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .save_state(),
            #[cfg(target_arch = "x86_64")]
            ioapic: vm
                .ioapic()
                .map(|io| io.lock().unwrap_or_else(|e| e.into_inner()).save_state()),
            virtio,
        })
    }

    /// Puts every device back in its saved state: the devices were attached from the
    /// snapshot's configuration, in the same order. `on_first_byte` runs at the console's
    /// next output byte.
    pub fn restore_state(
        &self,
        vm: &Vm,
        saved: &DevicesState,
        on_first_byte: Option<Box<dyn FnOnce() + Send>>,
    ) -> Result<(), DeviceStateError> {
        self.check_snapshot_support()?;
        let legacy = self.legacy.as_ref().ok_or(DeviceStateError::NoConsole)?;
        #[cfg(target_arch = "x86_64")]
        {
            match (vm.ioapic(), &saved.ioapic) {
                (Some(io), Some(state)) => io
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .restore_state(state),
                (None, None) => {}
                (Some(_), None) => return Err(DeviceStateError::Ioapic("missing")),
                (None, Some(_)) => return Err(DeviceStateError::Ioapic("unexpected")),
            }
            legacy
                .i8042
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore_state(&saved.i8042);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = vm;
        legacy
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore_state(&saved.serial, on_first_byte)?;
        let here: Vec<_> = self.virtio.iter().filter(|v| v.mmio.is_some()).collect();
        if here.len() != saved.virtio.len() {
            return Err(DeviceStateError::VirtioCount {
                saved: saved.virtio.len(),
                here: here.len(),
            });
        }
        for (index, (device, state)) in here.iter().zip(&saved.virtio).enumerate() {
            if device.label != state.label {
                return Err(DeviceStateError::VirtioLabel {
                    index,
                    saved: state.label.clone(),
                    here: device.label.clone(),
                });
            }
            if let Some(t) = &device.mmio {
                t.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .restore_state(&state.mmio)
                    .map_err(|source| DeviceStateError::Transport {
                        label: device.label.clone(),
                        source,
                    })?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::devices::virtio::test_utils::FakeDevice;
    use crate::memory::GuestMemoryMmap;
    use crate::stop::StopSignal;
    use vm_memory::GuestAddress;

    /// The platform devices and fake virtio devices named `ids`, attached in that order.
    fn devices(vm: &Vm, ids: &[&str]) -> DeviceManager {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut dm = DeviceManager::new().unwrap();
        dm.attach_platform(vm, 1, &StopSignal::new().unwrap(), None)
            .unwrap();
        for id in ids {
            dm.attach_virtio(vm, &mem, id, Arc::new(Mutex::new(FakeDevice::new(&[8]))))
                .unwrap();
        }
        dm
    }

    #[test]
    fn the_saved_devices_come_back_only_into_the_same_devices_in_the_same_order() {
        let vm = Vm::with_irqfds_for_tests();
        let saved = devices(&vm, &["snap-a", "snap-b"]).save_state(&vm).unwrap();
        assert_eq!(
            saved
                .virtio
                .iter()
                .map(|v| v.label.as_str())
                .collect::<Vec<_>>(),
            ["drive \"snap-a\"", "drive \"snap-b\""]
        );
        let json = serde_json::to_string(&saved).unwrap();
        let back: DevicesState = serde_json::from_str(&json).unwrap();

        let vm2 = Vm::with_irqfds_for_tests();
        devices(&vm2, &["snap-a", "snap-b"])
            .restore_state(&vm2, &back, None)
            .unwrap();
        let e = devices(&vm2, &["snap-a"])
            .restore_state(&vm2, &back, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("holds 2 virtio devices") && e.contains("has 1"),
            "{e}"
        );
        let e = devices(&vm2, &["snap-b", "snap-a"])
            .restore_state(&vm2, &back, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("device 0 is drive \"snap-a\""), "{e}");
    }
}

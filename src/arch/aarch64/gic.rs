//! The interrupt controller: KVM's vGIC, GICv3 (distributor and one redistributor per
//! vCPU) or GICv2 (distributor and CPU interface), created through `KVM_CREATE_DEVICE`
//! before the vCPUs and initialised after them (the vGIC sizes its per-vCPU state then).

use kvm_bindings::{
    KVM_DEV_ARM_VGIC_CTRL_INIT, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL,
    KVM_DEV_ARM_VGIC_GRP_NR_IRQS, KVM_VGIC_V2_ADDR_TYPE_CPU, KVM_VGIC_V2_ADDR_TYPE_DIST,
    KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST, kvm_create_device, kvm_device_attr,
    kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V2, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
};
use kvm_ioctls::{DeviceFd, VmFd};

use super::fdt::GicVersion;
use super::layout::{GIC_CPU_START, GIC_DIST_START, GIC_REDIST_START, GIC_SPIS};

/// Private interrupts (SGIs and PPIs) every GIC has before its SPIs.
const PRIVATE_IRQS: u32 = 32;

#[derive(Debug, thiserror::Error)]
pub enum GicError {
    #[error("this host's KVM cannot emulate a {0}: {1}")]
    Create(GicVersion, kvm_ioctls::Error),
    #[error("cannot set up the {version}'s {what}: {source}")]
    Attribute {
        version: GicVersion,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// The vGIC as created, until it is initialised.
pub struct Gic {
    fd: DeviceFd,
    pub version: GicVersion,
}

impl Gic {
    /// Creates a vGIC of `version` with its register frames where the layout puts them.
    pub fn create(vm: &VmFd, version: GicVersion) -> Result<Self, GicError> {
        let type_ = match version {
            GicVersion::V3 => kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
            GicVersion::V2 => kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V2,
        };
        let mut device = kvm_create_device {
            type_,
            fd: 0,
            flags: 0,
        };
        let fd = vm
            .create_device(&mut device)
            .map_err(|e| GicError::Create(version, e))?;
        let gic = Gic { fd, version };
        let frames: [(u32, u64, &str); 2] = match version {
            GicVersion::V3 => [
                (KVM_VGIC_V3_ADDR_TYPE_DIST, GIC_DIST_START, "distributor"),
                (
                    KVM_VGIC_V3_ADDR_TYPE_REDIST,
                    GIC_REDIST_START,
                    "redistributors",
                ),
            ],
            GicVersion::V2 => [
                (KVM_VGIC_V2_ADDR_TYPE_DIST, GIC_DIST_START, "distributor"),
                (KVM_VGIC_V2_ADDR_TYPE_CPU, GIC_CPU_START, "CPU interface"),
            ],
        };
        for (kind, addr, what) in frames {
            gic.set(KVM_DEV_ARM_VGIC_GRP_ADDR, u64::from(kind), &addr, what)?;
        }
        let irqs: u32 = PRIVATE_IRQS + GIC_SPIS;
        gic.set(KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, &irqs, "interrupt count")?;
        Ok(gic)
    }

    /// Sets one attribute whose value KVM reads from `value`.
    fn set<T>(&self, group: u32, attr: u64, value: &T, what: &'static str) -> Result<(), GicError> {
        let a = kvm_device_attr {
            group,
            attr,
            addr: value as *const T as u64,
            flags: 0,
        };
        self.fd
            .set_device_attr(&a)
            .map_err(|source| GicError::Attribute {
                version: self.version,
                what,
                source,
            })
    }

    /// Initialises the vGIC once every vCPU exists.
    pub fn finish(&self) -> Result<(), GicError> {
        let a = kvm_device_attr {
            group: KVM_DEV_ARM_VGIC_GRP_CTRL,
            attr: u64::from(KVM_DEV_ARM_VGIC_CTRL_INIT),
            addr: 0,
            flags: 0,
        };
        self.fd
            .set_device_attr(&a)
            .map_err(|source| GicError::Attribute {
                version: self.version,
                what: "initialisation",
                source,
            })
    }
}

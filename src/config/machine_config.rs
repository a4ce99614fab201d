//! `machine-config`: vCPUs, memory and how memory is backed.

use serde::{Deserialize, Serialize};

/// Most vCPUs a microVM may have (the MP table and the topology leaves are sized for it).
pub const MAX_VCPUS: u8 = 32;

/// How guest memory is backed on the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum HugePages {
    /// Ordinary 4 KiB pages.
    #[default]
    None,
    /// Ordinary pages with `madvise(MADV_HUGEPAGE)`, so the kernel may use transparent huge pages.
    Transparent,
    /// Explicit 2 MiB hugetlbfs pages, taken from the host's reserved pool.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// Where the interrupt controllers live (an ember extension of `machine-config`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Irqchip {
    /// x86_64: local APICs in KVM, the I/O APIC in ember, no PIC and no PIT: a VM's
    /// teardown costs a fraction of a millisecond instead of 10-20 ms
    /// (docs/performance.md). The default there.
    #[cfg_attr(not(target_arch = "aarch64"), default)]
    Split,
    /// Everything in KVM. x86_64: local APICs, I/O APIC, both PICs and the PIT. arm64 (the
    /// default there): KVM's GIC, v3 if the host can emulate it, else v2.
    #[cfg_attr(target_arch = "aarch64", default)]
    Kernel,
    /// arm64: KVM's GICv2 (distributor and CPU interface), as a Raspberry Pi 4 has.
    #[serde(rename = "gicv2")]
    GicV2,
    /// arm64: KVM's GICv3 (distributor and redistributors).
    #[serde(rename = "gicv3")]
    GicV3,
}

impl Irqchip {
    pub fn is_default(&self) -> bool {
        *self == Irqchip::default()
    }

    /// The name the API and config files use.
    pub fn name(&self) -> &'static str {
        match self {
            Irqchip::Split => "split",
            Irqchip::Kernel => "kernel",
            Irqchip::GicV2 => "gicv2",
            Irqchip::GicV3 => "gicv3",
        }
    }

    /// Whether this host's architecture has it.
    pub fn available_here(&self) -> bool {
        match self {
            Irqchip::Kernel => true,
            Irqchip::Split => cfg!(target_arch = "x86_64"),
            Irqchip::GicV2 | Irqchip::GicV3 => cfg!(target_arch = "aarch64"),
        }
    }
}

/// Static CPU templates: on x86_64, CPUID feature ceilings named after instance families
/// (`arch::x86_64::cpu_template`, docs/configuration.md); `V1N1` is an arm64 template,
/// which ember does not have.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum CpuTemplate {
    #[default]
    None,
    C3,
    T2,
    T2S,
    T2CL,
    T2A,
    V1N1,
}

fn template_or_none<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<CpuTemplate>, D::Error> {
    let t: Option<CpuTemplate> = Deserialize::deserialize(d)?;
    Ok(t.filter(|t| *t != CpuTemplate::None))
}

/// The `machine-config` body and config-file key.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: usize,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub huge_pages: HugePages,
    /// `"None"` is read as no template, and no template is not shown, as clients expect.
    #[serde(
        default,
        deserialize_with = "template_or_none",
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_template: Option<CpuTemplate>,
    /// Shown only when not the default, so Firecracker clients see the shape they know.
    #[serde(default, skip_serializing_if = "Irqchip::is_default")]
    pub irqchip: Irqchip,
}

impl Default for MachineConfig {
    /// Firecracker's defaults: one vCPU, 128 MiB.
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
            cpu_template: None,
            irqchip: Irqchip::default(),
        }
    }
}

/// Why a `machine-config` was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MachineConfigError {
    #[error("machine-config.vcpu_count must be between 1 and {MAX_VCPUS}, got {0}")]
    VcpuCount(u8),
    #[error("machine-config.vcpu_count must be 1 or an even number when smt is enabled, got {0}")]
    SmtOddVcpus(u8),
    #[error("machine-config.mem_size_mib must be greater than 0")]
    ZeroMemory,
    #[error("machine-config.mem_size_mib {0} is beyond what a guest address space can hold")]
    MemoryTooLarge(usize),
    #[error(
        "machine-config.mem_size_mib must be a multiple of 2 when huge_pages is \"2M\", got {0}"
    )]
    HugePageAlignment(usize),
    #[error(
        "machine-config.cpu_template {0:?} is not available on {arch}: use {choices}",
        arch = std::env::consts::ARCH,
        choices = if cfg!(target_arch = "x86_64") {
            "C3, T2, T2S, T2CL or T2A (their vendor's hosts only) or \"None\""
        } else {
            "\"None\" or omit it"
        }
    )]
    CpuTemplate(CpuTemplate),
    #[error(
        "machine-config.irqchip \"{name}\" is not available on {arch}: use {choices}",
        name = .0.name(),
        arch = std::env::consts::ARCH,
        choices = if cfg!(target_arch = "aarch64") {
            "\"kernel\" (the default), \"gicv3\" or \"gicv2\""
        } else {
            "\"split\" (the default) or \"kernel\""
        }
    )]
    Irqchip(Irqchip),
}

/// Guest RAM above this is refused outright; hosts are checked against their own RAM later.
const MAX_MEM_MIB: usize = 1 << 20; // 1 TiB

impl MachineConfig {
    pub fn validate(&self) -> Result<(), MachineConfigError> {
        if self.vcpu_count == 0 || self.vcpu_count > MAX_VCPUS {
            return Err(MachineConfigError::VcpuCount(self.vcpu_count));
        }
        if self.smt && self.vcpu_count > 1 && !self.vcpu_count.is_multiple_of(2) {
            return Err(MachineConfigError::SmtOddVcpus(self.vcpu_count));
        }
        if self.mem_size_mib == 0 {
            return Err(MachineConfigError::ZeroMemory);
        }
        if self.mem_size_mib > MAX_MEM_MIB {
            return Err(MachineConfigError::MemoryTooLarge(self.mem_size_mib));
        }
        if self.huge_pages == HugePages::Hugetlbfs2M && !self.mem_size_mib.is_multiple_of(2) {
            return Err(MachineConfigError::HugePageAlignment(self.mem_size_mib));
        }
        if !self.irqchip.available_here() {
            return Err(MachineConfigError::Irqchip(self.irqchip));
        }
        match self.cpu_template {
            None | Some(CpuTemplate::None) => Ok(()),
            Some(CpuTemplate::V1N1) => Err(MachineConfigError::CpuTemplate(CpuTemplate::V1N1)),
            Some(_) if cfg!(target_arch = "x86_64") => Ok(()),
            Some(other) => Err(MachineConfigError::CpuTemplate(other)),
        }
    }

    /// Guest memory size in bytes.
    pub fn mem_size_bytes(&self) -> u64 {
        (self.mem_size_mib as u64) << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vcpus: u8, mem: usize) -> MachineConfig {
        MachineConfig {
            vcpu_count: vcpus,
            mem_size_mib: mem,
            ..Default::default()
        }
    }

    #[test]
    fn vcpu_bounds() {
        assert_eq!(
            config(0, 128).validate(),
            Err(MachineConfigError::VcpuCount(0))
        );
        assert_eq!(
            config(33, 128).validate(),
            Err(MachineConfigError::VcpuCount(33))
        );
        assert_eq!(config(1, 128).validate(), Ok(()));
        assert_eq!(config(32, 128).validate(), Ok(()));
    }

    #[test]
    fn smt_needs_even_vcpus() {
        let mut c = config(3, 128);
        c.smt = true;
        assert_eq!(c.validate(), Err(MachineConfigError::SmtOddVcpus(3)));
        c.vcpu_count = 4;
        assert_eq!(c.validate(), Ok(()));
        c.vcpu_count = 1;
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn memory_bounds() {
        assert_eq!(config(1, 0).validate(), Err(MachineConfigError::ZeroMemory));
        assert_eq!(
            config(1, MAX_MEM_MIB + 1).validate(),
            Err(MachineConfigError::MemoryTooLarge(MAX_MEM_MIB + 1))
        );
        let mut c = config(1, 129);
        c.huge_pages = HugePages::Hugetlbfs2M;
        assert_eq!(
            c.validate(),
            Err(MachineConfigError::HugePageAlignment(129))
        );
    }

    #[test]
    fn json_shape_matches_firecracker() {
        let c: MachineConfig = serde_json::from_str(
            r#"{"vcpu_count":2,"mem_size_mib":256,"smt":false,"huge_pages":"2M","track_dirty_pages":true}"#,
        )
        .unwrap();
        assert_eq!(c.huge_pages, HugePages::Hugetlbfs2M);
        assert!(c.track_dirty_pages);
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["huge_pages"], "2M");
        assert!(
            serde_json::from_str::<MachineConfig>(r#"{"vcpu_count":1}"#)
                .unwrap_err()
                .to_string()
                .contains("mem_size_mib")
        );
        assert!(
            serde_json::from_str::<MachineConfig>(
                r#"{"vcpu_count":1,"mem_size_mib":1,"huge_pages":"1G"}"#
            )
            .is_err()
        );
    }

    #[test]
    fn cpu_templates_of_this_architecture_accepted() {
        let mut c = config(1, 128);
        c.cpu_template = Some(CpuTemplate::None);
        assert_eq!(c.validate(), Ok(()));
        for t in ["C3", "T2", "T2S", "T2CL", "T2A"] {
            let template: CpuTemplate = serde_json::from_str(&format!("\"{t}\"")).unwrap();
            c.cpu_template = Some(template);
            let expected = if cfg!(target_arch = "x86_64") {
                Ok(())
            } else {
                Err(MachineConfigError::CpuTemplate(template))
            };
            assert_eq!(c.validate(), expected, "{t}");
        }
        c.cpu_template = Some(CpuTemplate::V1N1);
        assert_eq!(
            c.validate(),
            Err(MachineConfigError::CpuTemplate(CpuTemplate::V1N1))
        );
        assert!(serde_json::from_str::<CpuTemplate>("\"T3\"").is_err());
    }

    #[test]
    fn no_template_not_shown() {
        let none: MachineConfig = serde_json::from_str(
            r#"{"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "None"}"#,
        )
        .unwrap();
        assert_eq!(none.cpu_template, None);
        let shown = serde_json::to_value(&none).unwrap();
        assert!(shown.get("cpu_template").is_none(), "{shown}");
        let mut c = config(1, 128);
        c.cpu_template = Some(CpuTemplate::T2S);
        assert_eq!(serde_json::to_value(&c).unwrap()["cpu_template"], "T2S");
        let keys: Vec<String> = serde_json::to_value(config(2, 256))
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(
            keys,
            [
                "huge_pages",
                "mem_size_mib",
                "smt",
                "track_dirty_pages",
                "vcpu_count"
            ]
        );
    }

    #[test]
    fn irqchip_names_and_the_ones_this_architecture_has() {
        for (json, chip) in [
            ("\"split\"", Irqchip::Split),
            ("\"kernel\"", Irqchip::Kernel),
            ("\"gicv2\"", Irqchip::GicV2),
            ("\"gicv3\"", Irqchip::GicV3),
        ] {
            assert_eq!(serde_json::from_str::<Irqchip>(json).unwrap(), chip);
            assert_eq!(serde_json::to_string(&chip).unwrap(), json);
            assert_eq!(format!("\"{}\"", chip.name()), json);
        }
        let with = |irqchip| MachineConfig {
            irqchip,
            ..MachineConfig::default()
        };
        let (here, elsewhere) = if cfg!(target_arch = "aarch64") {
            (Irqchip::GicV2, Irqchip::Split)
        } else {
            (Irqchip::Split, Irqchip::GicV3)
        };
        assert_eq!(with(here).validate(), Ok(()));
        assert_eq!(with(Irqchip::Kernel).validate(), Ok(()));
        let e = with(elsewhere).validate().unwrap_err();
        assert_eq!(e, MachineConfigError::Irqchip(elsewhere));
        assert!(
            e.to_string()
                .contains(&format!("\"{}\" is not available on", elsewhere.name())),
            "{e}"
        );
    }
}

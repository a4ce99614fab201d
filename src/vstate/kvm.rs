//! The `/dev/kvm` handle and the capabilities ember relies on.

use kvm_bindings::KVM_API_VERSION;
#[cfg(target_arch = "x86_64")]
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("cannot open /dev/kvm: {0} (is KVM enabled, and may this user open it?)")]
    Open(kvm_ioctls::Error),
    #[error("/dev/kvm speaks API version {0}, ember needs version {KVM_API_VERSION}")]
    ApiVersion(i32),
    #[error("KVM on this host lacks the {0} capability, which ember needs")]
    MissingCap(&'static str),
    #[cfg(target_arch = "x86_64")]
    #[error("cannot read the CPUID KVM supports: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
}

/// KVM_GET_SUPPORTED_CPUID's answer, once asked.
#[cfg(target_arch = "x86_64")]
static SUPPORTED_CPUID: std::sync::OnceLock<CpuId> = std::sync::OnceLock::new();

/// An open `/dev/kvm` known to have everything ember needs.
pub struct KvmContext {
    pub kvm: Kvm,
}

impl KvmContext {
    pub fn open() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION as i32 {
            return Err(KvmError::ApiVersion(version));
        }
        if let Some((_, name)) = crate::arch::REQUIRED_KVM_CAPS
            .iter()
            .find(|(cap, _)| !kvm.check_extension(*cap))
        {
            return Err(KvmError::MissingCap(name));
        }
        Ok(KvmContext { kvm })
    }

    /// What KVM can show a guest of this host's CPU. Asked once per process (it is the
    /// largest single set-up call, about 0.3 ms here, and cannot change while ember runs);
    /// [`Self::prefetch_cpuid`] asks ahead, off the path to the first guest instruction.
    #[cfg(target_arch = "x86_64")]
    pub fn supported_cpuid(&self) -> Result<CpuId, KvmError> {
        if let Some(cached) = SUPPORTED_CPUID.get() {
            return Ok(cached.clone());
        }
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::SupportedCpuid)?;
        Ok(SUPPORTED_CPUID.get_or_init(|| cpuid).clone())
    }

    /// Asks for [`Self::supported_cpuid`] now, so the VM's start finds it cached; a
    /// failure is reported again by the call that needs the answer.
    pub fn prefetch_cpuid(&self) {
        #[cfg(target_arch = "x86_64")]
        let _ = self.supported_cpuid();
    }

    /// Most vCPUs this host's KVM allows in one VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }
}

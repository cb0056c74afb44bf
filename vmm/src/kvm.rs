//! KVM probe: access, API version, capabilities and the kind of KVM (hardware, nested, PVM).
//!
//! `kiln doctor` prints the probe and the harness uses [`KvmProbe::linux_capable`] to choose
//! between kiln's own VMM and the QEMU backend. The probe never panics: a host without
//! /dev/kvm, or without access to it, is a normal answer.

use std::io::ErrorKind;
use std::path::Path;

use kvm_ioctls::{Cap, Kvm};
use serde::Serialize;

/// The KVM device node.
pub const KVM_DEVICE: &str = "/dev/kvm";
const CPUINFO: &str = "/proc/cpuinfo";
/// Present when the PVM (pagetable-based virtual machine) KVM module is loaded.
const PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// What probing the host's KVM found.
#[derive(Debug, Clone, Serialize)]
pub struct KvmProbe {
    /// The device node probed.
    pub device: String,
    /// Whether kiln could open it.
    pub access: KvmAccess,
    /// KVM_GET_API_VERSION, when the device could be opened.
    pub api_version: Option<i32>,
    /// Each capability kiln's VMM checks for.
    pub capabilities: Vec<CapabilityCheck>,
    /// KVM_CAP_MAX_VCPUS, when the device could be opened.
    pub max_vcpus: Option<usize>,
    /// What kind of KVM this is.
    pub kind: KvmKind,
    /// What that means for kiln, in plain words.
    pub consequence: String,
}

/// Whether /dev/kvm could be opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvmAccess {
    /// Opened read-write.
    Ok,
    /// No /dev/kvm.
    Missing,
    /// /dev/kvm exists but this user may not open it.
    PermissionDenied,
    /// Opening failed for another reason.
    Other(String),
}

impl KvmAccess {
    /// What to do about it, in one sentence; empty for [`KvmAccess::Ok`].
    pub fn advice(&self) -> String {
        match self {
            Self::Ok => String::new(),
            Self::Missing => format!(
                "{KVM_DEVICE} does not exist: load kvm_intel or kvm_amd, or enable virtualization \
                 (VT-x/AMD-V) in the firmware or the hypervisor running this machine"
            ),
            Self::PermissionDenied => format!(
                "{KVM_DEVICE} is not accessible to this user: add yourself to the `kvm` group \
                 (`sudo usermod -aG kvm $USER`, then log in again) or grant access with \
                 `sudo setfacl -m u:$USER:rw {KVM_DEVICE}`"
            ),
            Self::Other(e) => format!("opening {KVM_DEVICE} failed: {e}"),
        }
    }
}

/// One KVM capability and whether kiln's VMM needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CapabilityCheck {
    /// KVM's name for the capability.
    pub name: String,
    /// Whether KVM reports it.
    pub present: bool,
    /// Whether kiln's VMM cannot run without it.
    pub required: bool,
}

/// The kind of KVM on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KvmKind {
    /// Hardware virtualization (VMX or SVM) on bare metal.
    Hardware,
    /// Hardware virtualization exposed by a hypervisor (nested KVM).
    Nested,
    /// PVM: paravirtualized nested KVM without VMX/SVM; guest kernel code is emulated.
    Pvm,
    /// KVM opens, but neither VMX/SVM nor PVM explains how.
    Unknown,
    /// KVM cannot be used.
    Unavailable,
}

impl std::fmt::Display for KvmKind {
    /// The lowercase name, as in `kiln doctor --json`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Hardware => "hardware",
            Self::Nested => "nested",
            Self::Pvm => "pvm",
            Self::Unknown => "unknown",
            Self::Unavailable => "unavailable",
        })
    }
}

impl KvmKind {
    /// What this kind of KVM means for kiln, in plain words.
    pub fn consequence(self) -> &'static str {
        match self {
            Self::Hardware => {
                "hardware KVM (VMX/SVM): kiln's own VMM boots Linux guests at native speed"
            }
            Self::Nested => {
                "nested KVM (VMX/SVM inside a VM): kiln's own VMM boots Linux guests, somewhat \
                 slower than on bare metal"
            }
            Self::Pvm => {
                "PVM (paravirtualized nested KVM, no VMX/SVM): small bare-metal guests run, Linux \
                 guests cannot boot through this KVM; use the QEMU backend"
            }
            Self::Unknown => {
                "KVM works but the CPU shows no VMX/SVM and this is not PVM: small bare-metal \
                 guests may run, Linux guests are not expected to boot; use the QEMU backend"
            }
            Self::Unavailable => {
                "no usable KVM: kiln's own VMM cannot run here; use the QEMU backend (TCG)"
            }
        }
    }
}

/// The capabilities kiln checks: (KVM name, capability, required by kiln's VMM).
fn capability_list() -> [(&'static str, Cap, bool); 8] {
    [
        ("KVM_CAP_IRQCHIP", Cap::Irqchip, true),
        ("KVM_CAP_PIT2", Cap::Pit2, true),
        ("KVM_CAP_IOEVENTFD", Cap::Ioeventfd, true),
        ("KVM_CAP_IRQFD", Cap::Irqfd, true),
        ("KVM_CAP_USER_MEMORY", Cap::UserMemory, true),
        ("KVM_CAP_SET_TSS_ADDR", Cap::SetTssAddr, true),
        ("KVM_CAP_EXT_CPUID", Cap::ExtCpuid, true),
        // Without it the VMM falls back to signals alone to kick vCPUs out of KVM_RUN.
        ("KVM_CAP_IMMEDIATE_EXIT", Cap::ImmediateExit, false),
    ]
}

impl KvmProbe {
    /// True when Linux guests can boot through kiln's own VMM on this KVM.
    pub fn linux_capable(&self) -> bool {
        self.kind.linux_capable() && self.missing_required().is_empty()
    }

    /// Names of required capabilities KVM did not report.
    pub fn missing_required(&self) -> Vec<&str> {
        self.capabilities
            .iter()
            .filter(|c| c.required && !c.present)
            .map(|c| c.name.as_str())
            .collect()
    }
}

impl KvmKind {
    /// True for the kinds that run Linux guests (hardware and nested VMX/SVM).
    pub fn linux_capable(self) -> bool {
        matches!(self, Self::Hardware | Self::Nested)
    }
}

/// Probes /dev/kvm, /proc/cpuinfo and the loaded modules of this host.
pub fn probe() -> KvmProbe {
    let (access, kvm) = match Kvm::new() {
        Ok(kvm) => (KvmAccess::Ok, Some(kvm)),
        Err(e) => (access_from_errno(e.errno()), None),
    };
    let api_version = kvm.as_ref().map(Kvm::get_api_version);
    let max_vcpus = kvm.as_ref().map(Kvm::get_max_vcpus);
    let capabilities = capability_list()
        .into_iter()
        .map(|(name, cap, required)| CapabilityCheck {
            name: name.to_string(),
            present: kvm.as_ref().is_some_and(|k| k.check_extension(cap)),
            required,
        })
        .collect();
    // Without /proc/cpuinfo the CPU flags are unknown; classify then falls back to Unknown.
    let cpuinfo = std::fs::read_to_string(CPUINFO).unwrap_or_default();
    let pvm = Path::new(PVM_MODULE).exists();
    let kind = classify(&cpuinfo, pvm, kvm.is_some());

    let mut probe = KvmProbe {
        device: KVM_DEVICE.to_string(),
        access,
        api_version,
        capabilities,
        max_vcpus,
        kind,
        consequence: String::new(),
    };
    probe.consequence = consequence(&probe);
    tracing::debug!(?probe.kind, ?probe.access, "KVM probed");
    probe
}

fn access_from_errno(errno: i32) -> KvmAccess {
    match std::io::Error::from_raw_os_error(errno).kind() {
        ErrorKind::NotFound => KvmAccess::Missing,
        ErrorKind::PermissionDenied => KvmAccess::PermissionDenied,
        _ => KvmAccess::Other(std::io::Error::from_raw_os_error(errno).to_string()),
    }
}

/// The kind's consequence, extended with the access advice or missing capabilities.
fn consequence(probe: &KvmProbe) -> String {
    let mut text = probe.kind.consequence().to_string();
    if probe.access != KvmAccess::Ok {
        text = format!("{text} ({})", probe.access.advice());
    }
    let missing = probe.missing_required();
    if !missing.is_empty() {
        text = format!(
            "{text}; missing required capabilities: {}, so kiln's own VMM cannot run",
            missing.join(", ")
        );
    }
    text
}

/// Classifies KVM from /proc/cpuinfo text, whether kvm_pvm is loaded, and whether /dev/kvm opened.
pub fn classify(cpuinfo: &str, pvm_module: bool, kvm_usable: bool) -> KvmKind {
    if !kvm_usable {
        return KvmKind::Unavailable;
    }
    let flags = cpu_flags(cpuinfo);
    let has = |flag: &str| flags.contains(&flag);
    let hardware = has("vmx") || has("svm");
    if hardware {
        // `hypervisor` is the CPUID "running under a hypervisor" bit: VMX/SVM is passed through.
        if has("hypervisor") {
            KvmKind::Nested
        } else {
            KvmKind::Hardware
        }
    } else if pvm_module {
        KvmKind::Pvm
    } else {
        KvmKind::Unknown
    }
}

/// The `flags` of the first processor in /proc/cpuinfo text (all processors share them).
fn cpu_flags(cpuinfo: &str) -> Vec<&str> {
    cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(key, _)| key.trim() == "flags")
        .map(|(_, value)| value.split_whitespace().collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpuinfo(flags: &str) -> String {
        format!(
            "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Test CPU\n\
             flags\t\t: {flags}\nbugs\t\t: spectre_v1\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
        )
    }

    const BASE: &str = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov sse sse2";

    #[test]
    fn vmx_or_svm_without_hypervisor_is_hardware() {
        let intel = cpuinfo(&format!("{BASE} vmx ept"));
        assert_eq!(classify(&intel, false, true), KvmKind::Hardware);
        let amd = cpuinfo(&format!("{BASE} svm npt"));
        assert_eq!(classify(&amd, false, true), KvmKind::Hardware);
    }

    #[test]
    fn vmx_with_hypervisor_flag_is_nested() {
        let info = cpuinfo(&format!("{BASE} vmx hypervisor"));
        assert_eq!(classify(&info, false, true), KvmKind::Nested);
        // Hardware flags win over a loaded kvm_pvm module: KVM then uses VMX/SVM.
        assert_eq!(classify(&info, true, true), KvmKind::Nested);
    }

    #[test]
    fn pvm_module_without_vmx_is_pvm() {
        let info = cpuinfo(&format!("{BASE} hypervisor"));
        assert_eq!(classify(&info, true, true), KvmKind::Pvm);
    }

    #[test]
    fn neither_hardware_nor_pvm_is_unknown() {
        let info = cpuinfo(&format!("{BASE} hypervisor"));
        assert_eq!(classify(&info, false, true), KvmKind::Unknown);
        assert_eq!(classify("", false, true), KvmKind::Unknown);
    }

    #[test]
    fn unusable_kvm_is_unavailable_whatever_the_cpu() {
        let info = cpuinfo(&format!("{BASE} vmx"));
        assert_eq!(classify(&info, false, false), KvmKind::Unavailable);
        assert_eq!(classify(&info, true, false), KvmKind::Unavailable);
    }

    #[test]
    fn flags_are_matched_as_whole_words() {
        // "vmx_flags"-style words and a model name containing "svm" must not count.
        let info = "model name\t: svm vmx lookalike\nflags\t\t: fpu vmx_ept_x svmfoo\n";
        assert_eq!(classify(info, false, true), KvmKind::Unknown);
    }

    #[test]
    fn only_hardware_and_nested_are_linux_capable() {
        assert!(KvmKind::Hardware.linux_capable());
        assert!(KvmKind::Nested.linux_capable());
        assert!(!KvmKind::Pvm.linux_capable());
        assert!(!KvmKind::Unknown.linux_capable());
        assert!(!KvmKind::Unavailable.linux_capable());
    }

    #[test]
    fn kinds_serialize_as_lowercase_strings() {
        let json = serde_json::to_string(&[KvmKind::Hardware, KvmKind::Pvm]).unwrap();
        assert_eq!(json, r#"["hardware","pvm"]"#);
        assert_eq!(
            serde_json::to_string(&KvmAccess::PermissionDenied).unwrap(),
            r#""permission_denied""#
        );
    }

    #[test]
    fn errno_maps_to_access() {
        assert_eq!(access_from_errno(libc::ENOENT), KvmAccess::Missing);
        assert_eq!(access_from_errno(libc::EACCES), KvmAccess::PermissionDenied);
        assert!(matches!(access_from_errno(libc::EIO), KvmAccess::Other(_)));
        assert!(KvmAccess::PermissionDenied
            .advice()
            .contains("usermod -aG kvm"));
        assert!(KvmAccess::PermissionDenied.advice().contains("setfacl"));
        assert!(KvmAccess::Missing.advice().contains("kvm_intel"));
    }

    #[test]
    fn missing_required_capability_makes_kvm_not_linux_capable() {
        let mut probe = KvmProbe {
            device: KVM_DEVICE.to_string(),
            access: KvmAccess::Ok,
            api_version: Some(12),
            capabilities: vec![
                CapabilityCheck {
                    name: "KVM_CAP_IRQCHIP".into(),
                    present: true,
                    required: true,
                },
                CapabilityCheck {
                    name: "KVM_CAP_IMMEDIATE_EXIT".into(),
                    present: false,
                    required: false,
                },
            ],
            max_vcpus: Some(8),
            kind: KvmKind::Hardware,
            consequence: String::new(),
        };
        assert!(probe.linux_capable());
        probe.capabilities[0].present = false;
        assert!(!probe.linux_capable());
        assert!(consequence(&probe).contains("missing required capabilities: KVM_CAP_IRQCHIP"));
    }

    /// Runs the real probe on this host: it must answer, whatever the host has.
    #[test]
    fn probe_answers_on_this_host() {
        let probe = probe();
        assert_eq!(probe.device, KVM_DEVICE);
        assert_eq!(probe.capabilities.len(), capability_list().len());
        assert!(!probe.consequence.is_empty());
        match probe.access {
            KvmAccess::Ok => {
                assert_eq!(
                    probe.api_version,
                    Some(12),
                    "KVM_API_VERSION is 12 since 2.6.22"
                );
                assert_ne!(probe.kind, KvmKind::Unavailable);
            }
            _ => {
                assert_eq!(probe.api_version, None);
                assert_eq!(probe.kind, KvmKind::Unavailable);
                assert!(probe.capabilities.iter().all(|c| !c.present));
            }
        }
    }
}

//! kiln-vmm: the embedded VMM. Boots a guest through /dev/kvm from inside the calling process.

pub mod arch;
pub mod kvm;
pub mod layout;

pub use kiln_vmm as vmm;

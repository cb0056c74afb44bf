//! KVM probe: access, API version, capabilities and the kind of KVM (hardware, nested, PVM).

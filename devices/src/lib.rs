//! kiln-devices: device models independent of KVM (serial, i8042, debug ports, virtio).

//! The machines the VMM builds for each guest kind: what the VM holds
//! (memory layout, devices), how its vCPU starts, and the VMM's half of
//! its `KVM_RUN` loop.
//!
//! - [`linux`]: a Linux kernel and initramfs (the 64-bit boot protocol,
//!   COM1, the i8042 reset, the emulation assist, the boot timeline).
//! - [`builtin`]: the built-in CPL3 guests (the touch guest, the latency
//!   probe, the L1 hypervisor): RAM and one vCPU; their doorbells are read
//!   by the commands that run them.
//! - [`emulated_host`]: not a guest of ours but the host we run in - QEMU
//!   emulating an AMD SVM machine whose kernel loads the real `kvm_amd`,
//!   with a command of ours inside.

pub mod builtin;
pub mod emulated_host;
pub mod linux;

//! The KVM objects the VMM owns, after Firecracker's `vstate`: the
//! `/dev/kvm` handle ([`kvm`]), one [`vm::Vm`] that owns the VM fd and
//! keeps its guest memory mapped, and one [`vcpu::Vcpu`] that owns a vCPU
//! fd and runs the one `KVM_RUN` loop, handing each exit to an
//! [`vcpu::ExitHandler`]. Commands talk to these types, never to raw fds.
//! [`irqchip`] guards against a PIC interrupt the in-kernel irqchip
//! leaves pending.

pub mod irqchip;
pub mod kvm;
pub mod vcpu;
pub mod vm;

pub use kvm::KvmError;
pub use vcpu::{ExitHandler, Handled, RunControl, Vcpu, VcpuError};
pub use vm::{SlotMemory, Vm, VmError};

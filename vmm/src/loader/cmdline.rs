//! The kernel command line: the default one (chosen by measurement on this
//! host: see the README) and the user's replacement or addition.

use linux_loader::loader::Cmdline;

use crate::arch::x86_64::layout::CMDLINE_MAX;

/// `clearcpuid=` list: host-passthrough CPUID features whose instructions
/// the host emulator cannot run at guest CPL0 (README, Booting Linux).
pub const CLEARCPUID: &str = "ssse3,sse4_1,sse4_2,pclmulqdq,aes,avx,avx2,sha_ni,popcnt,rdrand,rdseed,fsgsbase,smap,smep,invpcid,pcid,avx512f";

/// initcalls skipped by default: work a booting guest does not need that
/// costs minutes of emulated CPL0 time here (found with `--profile-ms`):
/// ftrace's weak-function check (a kallsyms lookup per ftrace record), the
/// trace-event enum-map rewrite and tracefs event directories, the blake2s
/// self-test, and the kfunc registrations whose first call parses and
/// verifies the whole vmlinux BTF (tcp_cubic's among them: the guest's TCP
/// falls back to reno), and the jitterentropy RNG's start-up health test
/// (`jent_mod_init`, built in on 6.12 and still running 1,000 s into it;
/// only FIPS mode needs it as the DRBG's seed source, `drbg_prepare_hrng()`).
pub const INITCALL_BLACKLIST: &str = "ftrace_check_for_weak_functions,trace_eval_init,\
event_trace_init,blake2s_mod_init,cubictcp_register,bpf_tcp_ca_kfunc_init,\
bpf_prog_test_run_init,bpf_key_sig_kfuncs_init,kfunc_init,jent_mod_init";

/// The default kernel command line. `mitigations=off` makes the kernel
/// patch every return/retpoline site once at boot, instead of running the
/// SRSO/retpoline thunks on every call and return; `rodata=off` skips the
/// read-only remapping and the W+X page-table walk.
pub fn default_cmdline() -> String {
    format!(
        "console=ttyS0 reboot=k panic=-1 nowatchdog init_on_alloc=0 audit=0 apparmor=0 \
         security=none mitigations=off cryptomgr.notests pci=off rodata=off 8250.nr_uarts=1 \
         initcall_blacklist={INITCALL_BLACKLIST} clearcpuid={CLEARCPUID}"
    )
}

/// The command line: `replace` or the default, then ` append`.
pub fn compose(replace: Option<&str>, append: Option<&str>) -> String {
    let mut line = replace.map_or_else(default_cmdline, str::to_string);
    if let Some(a) = append {
        line.push(' ');
        line.push_str(a);
    }
    line
}

/// `line` as linux-loader's checked command line (at most
/// [`CMDLINE_MAX`] bytes, printable).
pub fn checked(line: &str) -> Result<Cmdline, String> {
    let mut c = Cmdline::new(CMDLINE_MAX).map_err(|e| e.to_string())?;
    c.insert_str(line).map_err(|e| e.to_string())?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compose_and_check() {
        assert!(compose(None, None).starts_with("console=ttyS0"));
        assert_eq!(compose(Some("a=1"), Some("b=2")), "a=1 b=2");
        assert!(checked(&compose(None, None)).is_ok());
        assert!(checked(&"x".repeat(CMDLINE_MAX + 1)).is_err());
    }
}

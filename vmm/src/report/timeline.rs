//! The boot timeline: when the VMM reached each boot milestone, what the
//! guest's serial console said about init, and the final report (text and
//! JSON).

use std::time::{Duration, Instant};

use serde_json::json;

/// The kernel's line when it hands control to /init.
pub const RUN_INIT: &str = "as init process";
/// The kernel's panic when init dies.
pub const KILL_INIT: &str = "Attempted to kill init";

/// How the boot ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The guest reset through the i8042 after a normal run.
    Reboot,
    /// The kernel reached /init and init was killed (reason).
    InitKilled(String),
    /// Anything else (reason).
    Error(String),
}

impl Exit {
    /// The JSON name.
    pub fn name(&self) -> &'static str {
        match self {
            Exit::Reboot => "reboot",
            Exit::InitKilled(_) => "init-killed",
            Exit::Error(_) => "error",
        }
    }
}

/// Milestones, as offsets from VMM start.
#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    /// First KVM_RUN.
    pub first_run: Option<Duration>,
    /// First byte on the serial port.
    pub first_serial: Option<Duration>,
    /// The kernel's `Run /init` line.
    pub run_init: Option<Duration>,
    /// The init marker line.
    pub marker: Option<Duration>,
    /// Guest reset.
    pub reboot: Option<Duration>,
    /// Why init died (from the kernel's messages).
    pub init_killed: Option<String>,
    /// A kernel panic line seen.
    pub panic: Option<String>,
    /// The first line mentioning init's fault (segfault / trap).
    pub init_fault: Option<String>,
    marker_text: String,
    line: Vec<u8>,
}

impl Timeline {
    /// A timeline starting now, watching for `marker` on the console.
    pub fn new(start: Instant, marker: &str) -> Self {
        Timeline {
            start,
            first_run: None,
            first_serial: None,
            run_init: None,
            marker: None,
            reboot: None,
            init_killed: None,
            panic: None,
            init_fault: None,
            marker_text: marker.to_string(),
            line: Vec::new(),
        }
    }

    /// Time since start.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Record the first KVM_RUN.
    pub fn mark_first_run(&mut self) {
        self.first_run.get_or_insert(self.start.elapsed());
    }

    /// Record a guest reset.
    pub fn mark_reboot(&mut self) {
        self.reboot.get_or_insert(self.start.elapsed());
    }

    /// Feed serial output bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.first_serial.get_or_insert(self.start.elapsed());
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.line).into_owned();
                self.line.clear();
                self.on_line(line.trim_end());
            } else if self.line.len() < 4096 {
                self.line.push(b);
            }
        }
    }

    fn on_line(&mut self, line: &str) {
        let t = self.start.elapsed();
        if self.run_init.is_none() && line.contains("Run /") && line.contains(RUN_INIT) {
            self.run_init = Some(t);
        }
        if !self.marker_text.is_empty() && self.marker.is_none() && line.contains(&self.marker_text)
        {
            self.marker = Some(t);
        }
        if self.init_fault.is_none()
            && line.contains("init[1]")
            && (line.contains("segfault") || line.contains("trap"))
        {
            self.init_fault = Some(line.trim().to_string());
        }
        if let Some(i) = line.find("Kernel panic") {
            self.panic.get_or_insert(line[i..].to_string());
        }
        if let Some(i) = line.find(KILL_INIT) {
            let code = line[i..]
                .split("exitcode=")
                .nth(1)
                .and_then(|c| u32::from_str_radix(c.trim().trim_start_matches("0x"), 16).ok());
            let why = match code {
                Some(c) if c & 0x7f != 0 && c & 0x7f != 0x7f => {
                    let sig = c & 0x7f;
                    let name = match sig {
                        4 => " (SIGILL)",
                        11 => " (SIGSEGV)",
                        _ => "",
                    };
                    format!("init killed by signal {sig}{name}")
                }
                Some(c) => format!("init exited with status {}", (c >> 8) & 0xff),
                None => "init died".to_string(),
            };
            self.init_killed.get_or_insert(why);
        }
    }

    /// Classify the end of a run given how the vCPU stopped.
    pub fn classify(&self, stop_error: Option<String>) -> Exit {
        if let Some(e) = stop_error {
            return Exit::Error(e);
        }
        if let Some(why) = &self.init_killed {
            if self.run_init.is_some() {
                let mut why = why.clone();
                if let Some(f) = &self.init_fault {
                    why.push_str(": ");
                    why.push_str(f);
                }
                return Exit::InitKilled(why);
            }
        }
        if let Some(p) = &self.panic {
            return Exit::Error(p.clone());
        }
        Exit::Reboot
    }

    /// Human-readable report lines.
    pub fn report(&self, exit: &Exit, assists: &[(String, u64)]) -> String {
        let ms = |d: Option<Duration>| {
            d.map(|d| format!("{:>9.3} s", d.as_secs_f64()))
                .unwrap_or_else(|| "        -".into())
        };
        let mut s = String::from("--- boot timeline (from VMM start) ---\n");
        s += &format!("first KVM_RUN      {}\n", ms(self.first_run));
        s += &format!("first serial byte  {}\n", ms(self.first_serial));
        s += &format!("Run /init          {}\n", ms(self.run_init));
        s += &format!("init marker        {}\n", ms(self.marker));
        s += &format!("reboot             {}\n", ms(self.reboot));
        s += &format!("exit               {}", exit.name());
        match exit {
            Exit::InitKilled(w) | Exit::Error(w) => s += &format!(" ({w})\n"),
            Exit::Reboot => s += "\n",
        }
        s += "assists:";
        if assists.is_empty() {
            s += " none";
        }
        for (m, n) in assists {
            s += &format!(" {m}={n}");
        }
        s
    }

    /// The JSON report.
    pub fn json(
        &self,
        exit: &Exit,
        assists: &[(String, u64)],
        extra: serde_json::Value,
    ) -> serde_json::Value {
        let ms = |d: Option<Duration>| d.map(notifier::convert::duration_ms);
        let reason = match exit {
            Exit::InitKilled(w) | Exit::Error(w) => Some(w.clone()),
            Exit::Reboot => None,
        };
        let assists: serde_json::Map<String, serde_json::Value> =
            assists.iter().map(|(m, n)| (m.clone(), json!(n))).collect();
        let mut v = json!({
            "init_reached": self.run_init.is_some(),
            "userland": self.marker.is_some(),
            "ms_to_first_run": ms(self.first_run),
            "ms_to_first_serial": ms(self.first_serial),
            "ms_to_init": ms(self.run_init),
            "ms_to_marker": ms(self.marker),
            "ms_to_reboot": ms(self.reboot),
            "exit": exit.name(),
            "reason": reason,
            "assists": assists,
        });
        if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_killed_by_segv_is_detected() {
        let mut t = Timeline::new(Instant::now(), "MARK");
        t.feed(b"[  400.0] Run /init as init process\n");
        t.feed(b"[  401.0] init[1]: segfault at ffffffff81c00080 ip ffffffff81c00080 sp 7ffc error 15\n");
        t.feed(
            b"[  401.1] Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b\n",
        );
        assert!(t.run_init.is_some());
        let e = t.classify(None);
        assert_eq!(e.name(), "init-killed");
        let Exit::InitKilled(w) = e else {
            unreachable!()
        };
        assert!(w.contains("signal 11 (SIGSEGV)"), "{w}");
        let j = t.json(&t.classify(None), &[("int3".into(), 2)], json!({}));
        assert_eq!(j["init_reached"], true);
        assert_eq!(j["userland"], false);
        assert_eq!(j["assists"]["int3"], 2);
    }

    #[test]
    fn marker_and_reboot() {
        let mut t = Timeline::new(Instant::now(), "MARK");
        t.feed(b"Run /init as init process\nMA");
        t.feed(b"RK ok\n");
        assert!(t.marker.is_some());
        assert_eq!(t.classify(None), Exit::Reboot);
        t.feed(b"Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000004\n");
        let Exit::InitKilled(w) = t.classify(None) else {
            panic!()
        };
        assert!(w.contains("SIGILL"));
    }

    #[test]
    fn early_panic_is_an_error() {
        let mut t = Timeline::new(Instant::now(), "MARK");
        t.feed(b"Kernel panic - not syncing: VFS: Unable to mount root fs\n");
        assert_eq!(t.classify(None).name(), "error");
    }
}

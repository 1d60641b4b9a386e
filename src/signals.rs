//! Which signals drainit catches and what each one means for the pod.
//!
//! SIGTERM is the kubelet's "stop": it starts the drain instead of being forwarded. SIGCHLD drives
//! the reaper. Every other catchable signal is the app's business and is forwarded to it. Handlers
//! are installed before the app is spawned so that no signal sent during start-up is lost.

use std::str::FromStr;

use nix::sys::signal::Signal;
use signal_hook::consts::signal as sig;
use signal_hook_tokio::Signals;

/// The signal that starts the drain (what the kubelet and `docker stop` send).
pub const DRAIN_TRIGGER: i32 = sig::SIGTERM;

/// Forwarded to the app at any time. SIGKILL and SIGSTOP cannot be caught; SIGSEGV, SIGBUS, SIGILL
/// and SIGFPE report drainit's own faults (a handler that returns would fault again) and are left
/// alone; SIGPIPE is drainit's own broken pipes. SIGABRT, SIGSYS and SIGTRAP are caught although
/// tini leaves them: sent with kill(2) they are meant for the app (Go dumps its goroutines on
/// SIGABRT), and drainit raising one itself still ends it (abort() re-raises with the default
/// action; drainit sets no seccomp filter and no breakpoints).
const FORWARDED: [i32; 22] = [
    sig::SIGABRT,
    sig::SIGSYS,
    sig::SIGTRAP,
    nix::libc::SIGSTKFLT,
    sig::SIGHUP,
    sig::SIGINT,
    sig::SIGQUIT,
    sig::SIGUSR1,
    sig::SIGUSR2,
    sig::SIGALRM,
    sig::SIGCONT,
    sig::SIGTSTP,
    sig::SIGTTIN,
    sig::SIGTTOU,
    sig::SIGURG,
    sig::SIGXCPU,
    sig::SIGXFSZ,
    sig::SIGVTALRM,
    sig::SIGPROF,
    sig::SIGWINCH,
    sig::SIGIO,
    nix::libc::SIGPWR,
];

/// What a caught signal asks drainit to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meaning {
    /// A child changed state: reap.
    ChildExited,
    /// Start the drain (or, after a `drainit prestop` drain, stop the app now).
    Drain,
    /// SIGINT/SIGQUIT: an operator wants the app stopped now; during a drain this cuts it short.
    Interrupt(i32),
    /// Any other signal: the app's business.
    Forward(i32),
}

pub fn meaning(signal: i32) -> Meaning {
    match signal {
        sig::SIGCHLD => Meaning::ChildExited,
        DRAIN_TRIGGER => Meaning::Drain,
        sig::SIGINT | sig::SIGQUIT => Meaning::Interrupt(signal),
        other => Meaning::Forward(other),
    }
}

/// Every signal drainit handles, real-time signals included.
pub fn handled() -> impl Iterator<Item = i32> {
    [sig::SIGCHLD, DRAIN_TRIGGER].into_iter().chain(forwarded())
}

/// Every signal that reaches the app when drainit catches it (SIGINT and SIGQUIT too, after
/// they cut a drain short): what the forwarded-signals metric counts.
pub fn forwarded() -> impl Iterator<Item = i32> {
    FORWARDED
        .into_iter()
        .chain(libc_sigrtmin()..=libc_sigrtmax())
}

fn libc_sigrtmin() -> i32 {
    nix::libc::SIGRTMIN()
}

/// The real-time signal that `RTMIN` names, as the app's side counts: glibc (and so systemd, bash
/// and kill(1) in most images) calls 34 SIGRTMIN, while musl keeps 34 for itself and would shift
/// every `RTMIN+N` of the static build by one (systemd's RTMIN+3 is 37, not 38).
const NAMED_SIGRTMIN: i32 = 34;

fn libc_sigrtmax() -> i32 {
    nix::libc::SIGRTMAX()
}

/// Installs the handlers; the returned stream yields each caught signal's number.
pub fn install() -> std::io::Result<Signals> {
    Signals::new(handled())
}

/// A signal as users write it: `TERM`, `SIGTERM`, `15`, or a real-time one: `RTMIN+3`,
/// `SIGRTMAX-1` (what systemd in a container stops on).
pub fn parse_signal(text: &str) -> Result<i32, String> {
    let upper = text.trim().to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let number = name
        .parse::<i32>()
        .ok()
        .or_else(|| realtime(name))
        .or_else(|| {
            Signal::from_str(&format!("SIG{name}"))
                .ok()
                .map(|s| s as i32)
        })
        .filter(|n| Signal::try_from(*n).is_ok() || is_realtime(*n))
        .ok_or_else(|| {
            format!("expected a signal like TERM, SIGQUIT, 15 or RTMIN+3, got '{text}'")
        })?;
    if NEVER_STOPS.iter().any(|s| *s as i32 == number) {
        return Err(format!(
            "{} suspends, resumes or is ignored by default and cannot ask the app to stop: use TERM, QUIT, INT or the signal your app shuts down on",
            self::name(number)
        ));
    }
    Ok(number)
}

/// `RTMIN`, `RTMIN+N`, `RTMAX`, `RTMAX-N`.
fn realtime(name: &str) -> Option<i32> {
    let (base, rest) = if let Some(rest) = name.strip_prefix("RTMIN") {
        (NAMED_SIGRTMIN, rest)
    } else {
        (libc_sigrtmax(), name.strip_prefix("RTMAX")?)
    };
    let offset = match rest.chars().next() {
        None => 0,
        Some('+') => rest[1..].parse().ok()?,
        Some('-') => -rest[1..].parse::<i32>().ok()?,
        Some(_) => return None,
    };
    Some(base + offset).filter(|n| is_realtime(*n))
}

fn is_realtime(signal: i32) -> bool {
    (NAMED_SIGRTMIN..=libc_sigrtmax()).contains(&signal)
}

/// Signals that cannot ask an app to shut down: with one of these as the stop signal, every
/// drain would end in the budget kill.
const NEVER_STOPS: [Signal; 6] = [
    Signal::SIGSTOP,
    Signal::SIGTSTP,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGCONT,
    Signal::SIGCHLD,
];

/// `SIGHUP`, or `SIGRTMIN+3` / `SIGRTMAX` for real-time signals, for logs.
pub fn name(signal: i32) -> String {
    match Signal::try_from(signal) {
        Ok(known) => known.as_str().to_owned(),
        Err(_) if signal == NAMED_SIGRTMIN => "SIGRTMIN".to_owned(),
        Err(_) if signal == libc_sigrtmax() => "SIGRTMAX".to_owned(),
        Err(_) if is_realtime(signal) => format!("SIGRTMIN+{}", signal - NAMED_SIGRTMIN),
        Err(_) => format!("signal {signal}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_numbers_and_prefixes() {
        assert_eq!(parse_signal("TERM"), Ok(Signal::SIGTERM as i32));
        assert_eq!(parse_signal("SIGQUIT"), Ok(Signal::SIGQUIT as i32));
        assert_eq!(parse_signal("winch"), Ok(Signal::SIGWINCH as i32));
        assert_eq!(parse_signal("15"), Ok(Signal::SIGTERM as i32));
        let rtmin = NAMED_SIGRTMIN;
        assert_eq!(
            parse_signal("SIGRTMIN+3"),
            Ok(37),
            "systemd's stop signal, as glibc counts"
        );
        assert_eq!(parse_signal("rtmin"), Ok(rtmin));
        assert_eq!(parse_signal("RTMAX-1"), Ok(libc_sigrtmax() - 1));
        assert_eq!(parse_signal(&(rtmin + 3).to_string()), Ok(rtmin + 3));
        assert_eq!(name(rtmin + 3), "SIGRTMIN+3");
        for bad in ["RTMIN+99", "RTMAX+1", "RTMIN-1", "RTMINX"] {
            assert!(parse_signal(bad).is_err(), "{bad}");
        }
        for never_stops in ["STOP", "SIGTSTP", "CONT", "CHLD", "19"] {
            assert!(parse_signal(never_stops).is_err(), "{never_stops}");
        }
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("99").is_err());
    }

    #[test]
    fn term_drains_int_and_quit_interrupt_the_rest_forward() {
        assert_eq!(meaning(sig::SIGTERM), Meaning::Drain);
        assert_eq!(meaning(sig::SIGCHLD), Meaning::ChildExited);
        assert_eq!(meaning(sig::SIGINT), Meaning::Interrupt(sig::SIGINT));
        assert_eq!(meaning(sig::SIGHUP), Meaning::Forward(sig::SIGHUP));
        assert!(handled().any(|s| s == libc_sigrtmax()));
    }

    #[test]
    fn every_caught_signal_but_term_and_chld_reaches_the_app() {
        for signal in handled() {
            let reaches_the_app =
                matches!(meaning(signal), Meaning::Forward(_) | Meaning::Interrupt(_));
            assert_eq!(
                forwarded().any(|s| s == signal),
                reaches_the_app,
                "{}",
                name(signal)
            );
        }
        assert!(forwarded().all(|s| s != sig::SIGTERM && s != sig::SIGCHLD));
    }

    #[test]
    fn names_for_logs() {
        assert_eq!(name(sig::SIGHUP), "SIGHUP");
        assert_eq!(name(libc_sigrtmin() + 2), "SIGRTMIN+2");
    }
}

//! The validated configuration of a run: everything the command line says, checked as a whole
//! (the budget) before anything starts.

use std::net::SocketAddr;

use nix::sys::signal::Signal;

use crate::app::AppCommand;
use crate::budget::Budget;
use crate::cli::RunArgs;
use crate::drain::DrainPolicy;
use crate::exit::StartupError;

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub command: AppCommand,
    pub health_listen: SocketAddr,
    pub drain: DrainPolicy,
    pub budget: Budget,
    pub stop_signal: Signal,
    pub forward_to_group: bool,
}

impl RunConfig {
    pub fn from_args(args: RunArgs) -> Result<Self, StartupError> {
        let drain = DrainPolicy::Fixed(args.drain_delay);
        let budget = Budget::new(args.grace_period, drain.longest(), "--drain-delay")?;
        Ok(Self {
            command: AppCommand::from_argv(args.command)?,
            health_listen: args.health_listen,
            drain,
            budget,
            stop_signal: args.stop_signal,
            forward_to_group: args.group,
        })
    }
}

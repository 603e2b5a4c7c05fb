//! The fault and bad-input suite: tries what an attacker or a bad day would, against the real
//! processes, and records each case (what was done, expected, observed) for
//! docs/reliability.md (see `vncdispatch_tests::reliability`). Every case must pass, and the
//! counts of sessions lost or duplicated, orphaned Xvnc and leaked secrets must be zero.
//!
//! One test per group, one module per group, all in this one binary so the groups run in
//! parallel (and share one run id, which the report checks):
//! - [`bad_input`]: hostile input to every RPC and CLI.
//! - [`filesystem`]: filesystem attacks on the agent.
//! - [`display_process`]: stale displays, a full range, broken or killed Xvnc, agent restarts.
//! - [`distributed`]: blades down or frozen, the dispatcher killed, the store stopped or full.
//! - [`tokens`]: guessing, limits, use after end or expiry; shares under attack ([`shares`]).
//! - [`websocket`]: WebSocket and HTTP abuse of ws-proxy, and its restart under load; the
//!   viewer page against hostile links and framing ([`viewer`]).
//! - [`load`]: many clients over many users with a dispatcher restart.
//! - [`secrets`]: every path a secret travels, then a search for it everywhere.
//! - [`attacks`]: identities and encryption: roles, certificates, plaintext, fake agents,
//!   the original's HTTP route ([`http_route`]).
//! - `local_user` (its own binary, `tests/local_user.rs`, as one of its cases takes
//!   /tmp/.X11-unix from root for a while): a desktop user against the root agent.
//!
//! Helpers more than one group uses live in `vncdispatch_tests::reliability::{attack, ws}`.
//! `RELIABILITY_SOAK=1` makes the load case longer; its short form runs every time.
mod attacks;
mod bad_input;
mod display_process;
mod distributed;
mod filesystem;
mod http_route;
mod load;
mod secrets;
mod shares;
mod tokens;
mod viewer;
mod websocket;

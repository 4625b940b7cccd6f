//! End-to-end tests: the real `pigeon serve` on an ephemeral port, spoken to over real sockets.

mod support;

mod bench;
mod browser;
mod chat;
mod cli;
mod cluster;
mod contacts;
mod crash;
mod errors;
mod groups;
mod longpoll;
mod presence;
mod sdk;
mod sync;
mod tui;

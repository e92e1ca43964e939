//! `nembo ssh NAME`: a terminal on a cluster's node, over the coordinators
//! and the node agent's own mutual-TLS session (no inbound port, no keys to
//! hand out); `-- COMMAND` runs one command; `--proxy` carries ssh's bytes
//! for a `ProxyCommand`.

use std::io::{IsTerminal, Read, Write};

use anyhow::Result;
use nembo_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use crate::connect;

/// Puts the terminal in raw mode (keys, Ctrl-C included, go to the remote
/// side) and restores it when dropped.
struct RawMode(Option<rustix::termios::Termios>);

impl RawMode {
    fn enter() -> RawMode {
        let stdin = std::io::stdin();
        let Ok(saved) = rustix::termios::tcgetattr(&stdin) else {
            return RawMode(None);
        };
        let mut raw = saved.clone();
        raw.make_raw();
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw);
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin(),
                rustix::termios::OptionalActions::Now,
                saved,
            );
        }
    }
}

fn terminal_size() -> Option<pb::TerminalSize> {
    let ws = rustix::termios::tcgetwinsize(std::io::stdout())
        .or_else(|_| rustix::termios::tcgetwinsize(std::io::stdin()))
        .ok()?;
    Some(pb::TerminalSize {
        rows: u32::from(ws.ws_row),
        cols: u32::from(ws.ws_col),
    })
}

/// Runs the session; returns the remote exit code.
pub async fn ssh(
    cluster: &str,
    node_rank: u32,
    proxy: Option<u16>,
    force_tty: bool,
    command: &[String],
) -> Result<i32> {
    let client = connect::client().await?;
    // As ssh: a terminal for an interactive shell, pipes for a command.
    let tty = proxy.is_none()
        && (force_tty || command.is_empty())
        && std::io::stdin().is_terminal()
        && std::io::stdout().is_terminal();
    let start = pb::ShellStart {
        cluster: cluster.to_string(),
        node_rank,
        command: command.join(" "),
        terminal: if tty { terminal_size() } else { None },
        term: std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into()),
        forward_port: u32::from(proxy.unwrap_or(0)),
    };
    let (tx, rx) = mpsc::channel::<pb::ShellRequest>(64);
    let send = |m| pb::ShellRequest { msg: Some(m) };
    tx.send(send(pb::shell_request::Msg::Start(start))).await?;
    let mut c = client.clone();
    let mut replies = c.shell(ReceiverStream::new(rx)).await?.into_inner();
    let _raw = tty.then(RawMode::enter);

    // Stdin on a thread of its own: reads block.
    let input = tx.clone();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = input.blocking_send(send(pb::shell_request::Msg::StdinClosed(true)));
                    return;
                }
                Ok(n) => {
                    if input
                        .blocking_send(send(pb::shell_request::Msg::Stdin(buf[..n].to_vec())))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    let mut resized =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    loop {
        tokio::select! {
            r = replies.next() => {
                let Some(r) = r else {
                    anyhow::bail!("the session ended without an exit status");
                };
                match r?.msg {
                    Some(pb::shell_response::Msg::Output(d)) => {
                        let mut o = stdout.lock();
                        o.write_all(&d)?;
                        o.flush()?;
                    }
                    Some(pb::shell_response::Msg::Stderr(d)) => {
                        let mut e = stderr.lock();
                        e.write_all(&d)?;
                        e.flush()?;
                    }
                    Some(pb::shell_response::Msg::ExitCode(code)) => return Ok(code),
                    None => {}
                }
            }
            Some(()) = resized.recv(), if tty => {
                if let Some(size) = terminal_size() {
                    let _ = tx.send(send(pb::shell_request::Msg::Resize(size))).await;
                }
            }
        }
    }
}

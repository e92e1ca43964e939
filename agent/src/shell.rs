//! Shell sessions (`nembo ssh`), opened by the leader over this agent's
//! session: a login shell or a command in a pseudo-terminal, a command on
//! pipes, or a TCP stream to a local port (`--proxy`, for ssh's
//! ProxyCommand). No port is opened on the node. Owned by the session task:
//! when the session ends, its shells end with it.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;

use nembo_proto::agent::v1 as apb;
use nembo_proto::v1 as pb;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Input for one session.
enum Input {
    Data(Vec<u8>),
    Resize(pb::TerminalSize),
    Eof,
}

struct Session {
    input: mpsc::UnboundedSender<Input>,
    task: JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        // Aborting drops the child, whose process group is killed (below).
        self.task.abort();
    }
}

/// This session's shells.
pub struct Shells {
    out: mpsc::Sender<apb::SessionRequest>,
    open: HashMap<u64, Session>,
}

impl Shells {
    /// Shells whose output goes out on `out`.
    pub fn new(out: mpsc::Sender<apb::SessionRequest>) -> Self {
        Self {
            out,
            open: HashMap::new(),
        }
    }

    /// Carries out one order from the leader.
    pub fn order(&mut self, o: apb::ShellOrder) {
        let id = o.session_id;
        self.open.retain(|_, s| !s.task.is_finished());
        let input = match o.msg {
            Some(apb::shell_order::Msg::Open(open)) => {
                let (tx, rx) = mpsc::unbounded_channel();
                let task = tokio::spawn(run(id, open, rx, self.out.clone()));
                self.open.insert(id, Session { input: tx, task });
                return;
            }
            Some(apb::shell_order::Msg::Close(_)) => {
                self.open.remove(&id);
                return;
            }
            Some(apb::shell_order::Msg::Stdin(d)) => Input::Data(d),
            Some(apb::shell_order::Msg::Resize(r)) => Input::Resize(r),
            Some(apb::shell_order::Msg::StdinClosed(_)) => Input::Eof,
            None => return,
        };
        if let Some(s) = self.open.get(&id) {
            let _ = s.input.send(input);
        }
    }
}

fn output(id: u64, stdout: Vec<u8>, stderr: Vec<u8>, exit: Option<i32>) -> apb::SessionRequest {
    apb::SessionRequest {
        msg: Some(apb::session_request::Msg::ShellOutput(apb::ShellOutput {
            session_id: id,
            output: stdout,
            stderr,
            exit_code: exit,
        })),
    }
}

/// Runs one session to its end and reports how it ended.
async fn run(
    id: u64,
    open: apb::ShellOpen,
    input: mpsc::UnboundedReceiver<Input>,
    out: mpsc::Sender<apb::SessionRequest>,
) {
    let result = if open.forward_port != 0 {
        forward(id, open.forward_port, input, &out).await
    } else if let Some(size) = open.terminal {
        terminal(id, &open, size, input, &out).await
    } else {
        pipes(id, &open, input, &out).await
    };
    let code = result.unwrap_or_else(|e| {
        let _ = out.try_send(output(
            id,
            Vec::new(),
            format!("nembo-agent: {e}\n").into_bytes(),
            None,
        ));
        255
    });
    let _ = out
        .send(output(id, Vec::new(), Vec::new(), Some(code)))
        .await;
}

/// The shell's program: a login shell, or `bash -c COMMAND`.
fn shell_command(open: &apb::ShellOpen) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("setsid");
    // Its own session, with the terminal (its stdin) as its controlling
    // one when there is a terminal: job control and Ctrl-C work.
    cmd.arg("--wait");
    if open.terminal.is_some() {
        cmd.arg("--ctty");
    }
    cmd.arg("bash");
    if open.command.is_empty() {
        cmd.arg("-l");
    } else {
        cmd.arg("-c").arg(&open.command);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/".into());
    cmd.current_dir(&home)
        .env("HOME", &home)
        .envs(&open.env)
        .kill_on_drop(true);
    if !open.term.is_empty() {
        cmd.env("TERM", &open.term);
    }
    cmd
}

/// Kills the session's whole process group when dropped (the shell leads
/// its own session and group: `setsid`).
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let pg = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGHUP);
            let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn exit_code(s: std::process::ExitStatus) -> i32 {
    s.code()
        .or_else(|| s.signal().map(|n| 128 + n))
        .unwrap_or(255)
}

fn winsize(s: &pb::TerminalSize) -> rustix::termios::Winsize {
    rustix::termios::Winsize {
        ws_row: s.rows.clamp(1, u16::MAX as u32) as u16,
        ws_col: s.cols.clamp(1, u16::MAX as u32) as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// A pseudo-terminal pair: the master here, the slave for the shell.
fn open_pty(size: &pb::TerminalSize) -> std::io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::new())?;
    rustix::termios::tcsetwinsize(&master, winsize(size))?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    Ok((master, slave))
}

async fn terminal(
    id: u64,
    open: &apb::ShellOpen,
    size: pb::TerminalSize,
    mut input: mpsc::UnboundedReceiver<Input>,
    out: &mpsc::Sender<apb::SessionRequest>,
) -> std::io::Result<i32> {
    let (master, slave) = open_pty(&size)?;
    let mut cmd = shell_command(open);
    cmd.stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave));
    let mut child = cmd.spawn()?;
    let _group = GroupGuard(child.id());
    // The parent's copy of the slave is gone with `cmd`: the master reads
    // EIO once every process holding the terminal has exited.
    drop(cmd);
    let resize_fd = master.try_clone()?;
    let mut reader = tokio::fs::File::from_std(std::fs::File::from(master.try_clone()?));
    let mut writer = tokio::fs::File::from_std(std::fs::File::from(master));
    let out2 = out.clone();
    let mut pumping = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out2
                        .send(output(id, buf[..n].to_vec(), Vec::new(), None))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    let status = loop {
        tokio::select! {
            s = child.wait() => break s?,
            i = input.recv() => match i {
                Some(Input::Data(d)) => {
                    writer.write_all(&d).await?;
                    writer.flush().await?;
                }
                Some(Input::Resize(s)) => {
                    // The kernel sends the foreground group SIGWINCH.
                    let _ = rustix::termios::tcsetwinsize(&resize_fd, winsize(&s));
                }
                // A terminal's end of input is its EOF character.
                Some(Input::Eof) => {
                    writer.write_all(&[4]).await?;
                    writer.flush().await?;
                }
                None => {
                    std::future::pending::<()>().await;
                }
            },
        }
    };
    // Whatever it printed last, unless something it left behind holds the
    // terminal open.
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), &mut pumping).await;
    pumping.abort();
    Ok(exit_code(status))
}

async fn pipes(
    id: u64,
    open: &apb::ShellOpen,
    mut input: mpsc::UnboundedReceiver<Input>,
    out: &mpsc::Sender<apb::SessionRequest>,
) -> std::io::Result<i32> {
    let mut cmd = shell_command(open);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let _group = GroupGuard(child.id());
    let mut stdin = child.stdin.take();
    let so = tokio::spawn(copy_out(child.stdout.take(), id, out.clone(), false));
    let se = tokio::spawn(copy_out(child.stderr.take(), id, out.clone(), true));
    let status = loop {
        tokio::select! {
            s = child.wait() => break s?,
            i = input.recv() => match i {
                Some(Input::Data(d)) => {
                    if let Some(w) = stdin.as_mut() {
                        if w.write_all(&d).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                Some(Input::Eof) => stdin = None,
                Some(Input::Resize(_)) => {}
                None => std::future::pending::<()>().await,
            },
        }
    };
    let _ = so.await;
    let _ = se.await;
    Ok(exit_code(status))
}

async fn copy_out(
    r: Option<impl AsyncRead + Unpin>,
    id: u64,
    out: mpsc::Sender<apb::SessionRequest>,
    stderr: bool,
) {
    let Some(mut r) = r else { return };
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let data = buf[..n].to_vec();
        let m = if stderr {
            output(id, Vec::new(), data, None)
        } else {
            output(id, data, Vec::new(), None)
        };
        if out.send(m).await.is_err() {
            break;
        }
    }
}

/// `--proxy`: the bytes of a TCP connection to a port on this node.
async fn forward(
    id: u64,
    port: u32,
    mut input: mpsc::UnboundedReceiver<Input>,
    out: &mpsc::Sender<apb::SessionRequest>,
) -> std::io::Result<i32> {
    let port = u16::try_from(port)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "port out of range"))?;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let (r, mut w) = stream.into_split();
    let mut reading = tokio::spawn(copy_out(Some(r), id, out.clone(), false));
    loop {
        tokio::select! {
            _ = &mut reading => break,
            i = input.recv() => match i {
                Some(Input::Data(d)) => w.write_all(&d).await?,
                Some(Input::Eof) => w.shutdown().await?,
                Some(Input::Resize(_)) => {}
                None => break,
            },
        }
    }
    Ok(0)
}

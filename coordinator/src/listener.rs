//! The coordinator's one listener, with a cap on connections still in their
//! TLS handshake. Each accepted connection takes a slot for at most the
//! handshake timeout (or until it closes, if sooner): by then it has either
//! proved itself or been dropped by the TLS layer. When every slot is taken,
//! accepting pauses and new connections wait in the kernel's backlog, so
//! sockets that never finish a handshake cannot use up the process's files.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Accepts on `listener` for as long as the returned stream is read, with at
/// most `slots` connections in their first `handshake_timeout`.
pub fn accept(
    listener: TcpListener,
    handshake_timeout: Duration,
    slots: usize,
) -> ReceiverStream<io::Result<Connection>> {
    let (tx, rx) = mpsc::channel(16);
    let slots = Arc::new(Semaphore::new(slots.max(1)));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let accepted = listener.accept().await.map(|(stream, _)| {
                let _ = stream.set_nodelay(true);
                let (closed, on_close) = oneshot::channel::<()>();
                // The slot is given back at the timeout, or when the
                // connection closes before it.
                tokio::spawn(async move {
                    let _slot = slot;
                    let _ = tokio::time::timeout(handshake_timeout, on_close).await;
                });
                Connection {
                    stream,
                    _closed: closed,
                }
            });
            if tx.send(accepted).await.is_err() {
                return; // the server stopped
            }
        }
    });
    ReceiverStream::new(rx)
}

/// An accepted connection; dropping it gives its handshake slot back.
pub struct Connection {
    stream: TcpStream,
    _closed: oneshot::Sender<()>,
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

//! The coordinator's one listener, which does the TLS handshakes itself:
//! each with a deadline, and at most so many at once. A connection takes a
//! slot from accept to the end of its handshake; when every slot is taken,
//! accepting pauses and new connections wait in the kernel's backlog, so
//! sockets that never finish a handshake cannot use up the process's files.
//! Only connections that completed the handshake reach the gRPC server.
//! The certificate served is resolved at each handshake, so a member's
//! renewed certificate is served at once (see `identity::member`).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

/// Accepts on `listener` for as long as the returned stream is read, with at
/// most `slots` connections in their handshake, each for at most
/// `handshake_timeout`.
pub fn accept(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
    slots: usize,
) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(16);
    let slots = Arc::new(Semaphore::new(slots.max(1)));
    let acceptor = TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of files, most likely: wait for some to close
                    // rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return; // the server stopped
            }
            let _ = stream.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
                let done = handshake.await;
                drop(slot);
                match done {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

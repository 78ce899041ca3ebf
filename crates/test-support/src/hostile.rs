//! A hostile HTTP server on loopback: what a broken or malicious git server may send. It is a
//! hostile input for the builder's fetch path, not a git server; the real git servers of the
//! tests are `git http-backend` and `sshd`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// What the server answers to every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostility {
    /// A redirect with this status (301, 302, 303, 307, 308) to the same path: a loop.
    RedirectLoop(u16),
    /// Redirects between two paths of its own, forever.
    RedirectPingPong,
    /// A redirect to a `file://` URL on the builder's machine.
    RedirectToFile,
    /// A git smart-HTTP content type, then an endless body of junk pkt-lines.
    EndlessBody,
    /// Bytes that are not HTTP at all.
    Garbage,
    /// An endless response header.
    EndlessHeader,
    /// Accepts the connection and never answers.
    Silent,
}

/// A running hostile server; stops on drop.
pub struct HostileHttp {
    /// `http://127.0.0.1:PORT/owner/repo.git`
    pub url: String,
    stop: Arc<AtomicBool>,
    port: u16,
    thread: Option<JoinHandle<()>>,
}

/// Most bytes one connection is sent: large enough to be "huge" to a client, bounded so a test
/// never runs away.
const MAX_SENT: usize = 256 * 1024 * 1024;

impl HostileHttp {
    pub fn start(hostility: Hostility) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind loopback");
        let port = listener.local_addr().expect("local addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let stop = stop.clone();
                    std::thread::spawn(move || answer(stream, hostility, port, &stop));
                }
            })
        };
        Self {
            url: format!("http://127.0.0.1:{port}/owner/repo.git"),
            stop,
            port,
            thread: Some(thread),
        }
    }
}

impl Drop for HostileHttp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the stop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn answer(mut stream: TcpStream, hostility: Hostility, port: u16, stop: &AtomicBool) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let path = read_request_path(&mut stream);
    let redirect = |status: u16, location: &str| {
        format!("HTTP/1.1 {status} Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n")
    };
    let text = match hostility {
        Hostility::RedirectLoop(status) => redirect(status, &path),
        Hostility::RedirectPingPong => {
            let other = if path.starts_with("/ping") {
                format!("http://127.0.0.1:{port}/pong{path}")
            } else {
                format!("http://127.0.0.1:{port}/ping{path}")
            };
            redirect(302, &other)
        }
        Hostility::RedirectToFile => redirect(302, "file:///etc/passwd"),
        Hostility::Garbage => {
            "\u{0}\u{1}SSH-2.0-nonsense\r\n\u{ff}\u{fe}garbage without any http\n\n\n".to_owned()
        }
        Hostility::EndlessBody => {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-git-upload-pack-advertisement\r\nCache-Control: no-cache\r\n\r\n001e# service=git-upload-pack\n0000";
            endless(&mut stream, head.as_bytes(), b"ffff0123456789abcdef", stop);
            return;
        }
        Hostility::EndlessHeader => {
            endless(
                &mut stream,
                b"HTTP/1.1 200 OK\r\n",
                b"X-Junk: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
                stop,
            );
            return;
        }
        Hostility::Silent => {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
            }
            return;
        }
    };
    let _ = stream.write_all(text.as_bytes());
}

/// The path of the request line; the head is read up to a bound.
fn read_request_path(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while head.len() < 64 * 1024 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buffer[..n]),
        }
    }
    String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_owned()
}

fn endless(stream: &mut TcpStream, head: &[u8], chunk: &[u8], stop: &AtomicBool) {
    if stream.write_all(head).is_err() {
        return;
    }
    let block = chunk.repeat(64 * 1024 / chunk.len());
    let mut sent = 0;
    while sent < MAX_SENT && !stop.load(Ordering::SeqCst) {
        if stream.write_all(&block).is_err() {
            return;
        }
        sent += block.len();
    }
}

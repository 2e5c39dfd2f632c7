//! The reply socket: a way for a script to answer with a status, headers and
//! a binary body of its choosing instead of printing to stdout.
//!
//! When a route or consumer sets `reply-socket: true`, each invocation gets
//! a fresh directory (mode 0700, 128 random bits in its name) holding a unix
//! socket, and the command finds the socket's path in `EXECD_REPLY_SOCKET`.
//! The first connection may send one reply frame; execd answers `OK` or
//! `ERR <reason>` on the same connection, then stops listening. The
//! directory is removed when the invocation ends, however it ends.
//!
//! The frame (all ASCII except the body; `\n` line ends, `\r\n` accepted):
//!
//! ```text
//! EXECD-REPLY/1 <status> <body-length>\n
//! <Header-Name>: <value>\n          (zero or more)
//! \n
//! <body-length bytes of body>
//! ```
//!
//! `status` is 100-599; `body-length` is the exact byte count, so a reply cut
//! short by a crash is noticed, and it may not exceed the command's
//! `max-output`. A malformed or oversized frame is logged and turns into a
//! 502 `bad-reply` problem; it never takes execd down.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::CommandSpec;
use crate::pipeline::{Invocation, Reply};
use crate::problem;
use crate::runner::RunResult;

/// The variable that carries the socket path to the command.
pub const ENV: &str = "EXECD_REPLY_SOCKET";

/// The first bytes of every frame; the version is in it so the framing can
/// change without misreading old helpers.
pub const MAGIC: &str = "EXECD-REPLY/1";

/// Largest header block (status line and headers) accepted.
const MAX_HEAD: u64 = 64 * 1024;

/// Most header lines accepted in one reply.
const MAX_HEADERS: usize = 100;

/// Why a reply frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// The bytes do not follow the framing.
    #[error("malformed reply: {0}")]
    Malformed(String),
    /// The announced body is over the command's `max-output`.
    #[error("reply body of {len} bytes is over the limit of {limit} bytes (max-output)")]
    TooLarge { len: u64, limit: u64 },
    /// The connection ended before the announced body did.
    #[error("reply cut short: {got} of {want} body bytes arrived before the connection closed")]
    Truncated { got: u64, want: u64 },
    /// The command ended and the reply never completed.
    #[error("reply incomplete when the command ended")]
    Unfinished,
}

/// One invocation's socket, listening until [`ReplySocket::finish`].
pub struct ReplySocket {
    /// The private directory; removed on drop.
    dir: PathBuf,
    /// The socket inside it, as handed to the command.
    path: PathBuf,
    /// Told when the command has ended, so the listener stops waiting.
    ended: CancellationToken,
    /// Accepts the one connection and reads its frame.
    task: Option<JoinHandle<Option<Result<Reply, ReplyError>>>>,
}

impl ReplySocket {
    /// Creates the directory and socket for one invocation whose command
    /// may write at most `limit` body bytes, owned by `owner` (uid, gid)
    /// when the command runs as another user. Log lines name `route` and
    /// `request_id`.
    pub fn create(
        limit: u64,
        owner: Option<(u32, Option<u32>)>,
        route: Arc<str>,
        request_id: Arc<str>,
    ) -> std::io::Result<ReplySocket> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = std::env::temp_dir().join(format!("execd-reply-{}", crate::ids::random_hex(16)));
        // 0700 from the start (mkdir applies it before anyone can look), and
        // `create` fails rather than reuse something already there.
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let path = dir.join("reply.sock");
        let listener = match UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot create reply socket {} (a shorter TMPDIR helps if the path is too long): {e}",
                        path.display()
                    ),
                ));
            }
        };
        // A command that runs as another user (`user:`) must be able to
        // enter the directory and connect; still no one else can.
        if let Some((uid, gid)) = owner {
            for p in [&dir, &path] {
                if let Err(e) = std::os::unix::fs::chown(p, Some(uid), gid) {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("cannot hand reply socket {} to uid {uid}: {e}", p.display()),
                    ));
                }
            }
        }
        let ended = CancellationToken::new();
        let task = tokio::spawn(serve(listener, limit, ended.clone(), route, request_id));
        Ok(ReplySocket {
            dir,
            path,
            ended,
            task: Some(task),
        })
    }

    /// The socket path, for `EXECD_REPLY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Call once the command has ended: the reply it sent, if it sent one.
    pub async fn finish(mut self) -> Option<Result<Reply, ReplyError>> {
        self.ended.cancel();
        let task = self.task.take()?;
        task.await.ok().flatten()
    }
}

impl Drop for ReplySocket {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn serve(
    listener: UnixListener,
    limit: u64,
    ended: CancellationToken,
    route: Arc<str>,
    request_id: Arc<str>,
) -> Option<Result<Reply, ReplyError>> {
    let stream = tokio::select! {
        accepted = listener.accept() => accepted.ok().map(|(s, _)| s),
        _ = ended.cancelled() => accept_waiting(&listener),
    };
    // One reply per invocation: later connections are refused.
    drop(listener);
    let mut stream = stream?;
    let result = tokio::select! {
        r = read_frame(&mut stream, limit) => r,
        _ = async { ended.cancelled().await; tokio::time::sleep(crate::runner::AFTER_EXIT).await } => Err(ReplyError::Unfinished),
    };
    let answer = match &result {
        Ok(_) => "OK\n".to_string(),
        Err(e) => format!("ERR {e}\n"),
    };
    // The script may have gone already; its loss.
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
    if let Err(e) = &result {
        tracing::warn!(route = %route, request_id = %request_id, "reply socket: {e}; answering 502 bad-reply");
    }
    Some(result)
}

/// A connection the command made just before it ended may still sit in the
/// backlog, not yet reported by the reactor; take it directly.
fn accept_waiting(listener: &UnixListener) -> Option<UnixStream> {
    use std::os::fd::AsFd;
    let fd = listener.as_fd().try_clone_to_owned().ok()?;
    // The duplicate shares the listener's non-blocking mode: an empty
    // backlog is WouldBlock, not a wait.
    let std_listener = std::os::unix::net::UnixListener::from(fd);
    let (s, _) = std_listener.accept().ok()?;
    s.set_nonblocking(true).ok()?;
    UnixStream::from_std(s).ok()
}

/// Reads one frame; the body is read only after its length has been
/// checked against `limit`.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    r: R,
    limit: u64,
) -> Result<Reply, ReplyError> {
    let mut rd = BufReader::new(r);
    let mut head_left = MAX_HEAD;
    let first = read_line(&mut rd, &mut head_left).await?;
    if first.is_empty() {
        return Err(ReplyError::Malformed(
            "the connection closed before anything was sent".into(),
        ));
    }
    let (status, len) = parse_status_line(&first)?;
    if len > limit {
        return Err(ReplyError::TooLarge { len, limit });
    }
    let mut headers = Vec::new();
    loop {
        let line = read_line(&mut rd, &mut head_left).await?;
        if line.is_empty() {
            return Err(ReplyError::Malformed(
                "the connection closed inside the header block (a blank line must end it)".into(),
            ));
        }
        let line = line.strip_suffix('\n').unwrap_or(&line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if headers.len() == MAX_HEADERS {
            return Err(ReplyError::Malformed(format!(
                "more than {MAX_HEADERS} headers"
            )));
        }
        let (name, value) = parse_header(line)?;
        // Framing is execd's business: a script's own length or encoding
        // would contradict the body execd sends.
        if !matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "connection"
        ) {
            headers.push((name, value));
        }
    }
    let mut body = Vec::with_capacity(len.min(1 << 20) as usize);
    let got = (&mut rd)
        .take(len)
        .read_to_end(&mut body)
        .await
        .map_err(|e| ReplyError::Malformed(format!("reading the body failed: {e}")))?
        as u64;
    if got < len {
        return Err(ReplyError::Truncated { got, want: len });
    }
    Ok(Reply {
        status,
        headers,
        body: Bytes::from(body),
    })
}

/// One `\n`-terminated line of the header block, counted against its cap;
/// empty at end of stream.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    rd: &mut R,
    left: &mut u64,
) -> Result<String, ReplyError> {
    let mut buf = Vec::new();
    let n = rd
        .take(*left)
        .read_until(b'\n', &mut buf)
        .await
        .map_err(|e| ReplyError::Malformed(format!("reading the header block failed: {e}")))?;
    *left -= n as u64;
    if n > 0 && buf.last() != Some(&b'\n') {
        return Err(ReplyError::Malformed(if *left == 0 {
            format!("the header block is over {MAX_HEAD} bytes")
        } else {
            "the connection closed in the middle of a header line".into()
        }));
    }
    String::from_utf8(buf)
        .map_err(|_| ReplyError::Malformed("the header block is not UTF-8".into()))
}

fn parse_status_line(line: &str) -> Result<(u16, u64), ReplyError> {
    let bad = || {
        ReplyError::Malformed(format!(
            "expected `{MAGIC} <status> <body-length>` as the first line, got {:?}",
            line.chars().take(80).collect::<String>()
        ))
    };
    let line = line.trim_end_matches('\n').trim_end_matches('\r');
    let mut parts = line.split(' ');
    if parts.next() != Some(MAGIC) {
        return Err(bad());
    }
    let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let len: u64 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    if parts.next().is_some() {
        return Err(bad());
    }
    // 1xx are interim answers: no final response can have one.
    if !(200..=599).contains(&status) {
        return Err(ReplyError::Malformed(format!(
            "status {status} is not between 200 and 599"
        )));
    }
    Ok((status, len))
}

fn parse_header(line: &str) -> Result<(String, String), ReplyError> {
    let (name, value) = line
        .split_once(':')
        .ok_or_else(|| ReplyError::Malformed(format!("header line {line:?} has no `:`")))?;
    let name = name.trim();
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ReplyError::Malformed(format!("bad header name {name:?}")));
    }
    let value = value.trim();
    if has_control_char(value) {
        return Err(ReplyError::Malformed(format!(
            "header {name} holds a control character"
        )));
    }
    Ok((name.to_ascii_lowercase(), value.to_string()))
}

/// Whether a header value holds a control character other than tab: one
/// that would end its line early or smuggle bytes past it.
pub fn has_control_char(value: &str) -> bool {
    value.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f)
}

/// Opens a reply socket for this invocation when its command asks for one,
/// and puts the path into the command's environment (last, so a route's
/// own `env` cannot point it elsewhere).
pub fn offer(
    command: &CommandSpec,
    inv: &Invocation,
    spec: &mut crate::runner::RunSpec,
) -> Result<Option<ReplySocket>, crate::pipeline::Failure> {
    if !command.reply_socket {
        return Ok(None);
    }
    let owner = command
        .lockdown
        .as_ref()
        .and_then(|l| l.uid.map(|uid| (uid, l.gid)));
    let socket = ReplySocket::create(
        command.max_output,
        owner,
        inv.route.clone(),
        inv.request_id.clone(),
    )
    .map_err(|e| crate::pipeline::Failure::Internal(e.to_string()))?;
    spec.env
        .push((ENV.into(), socket.path().as_os_str().to_owned()));
    Ok(Some(socket))
}

/// A frame as a script would send it.
pub fn encode(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{MAGIC} {status} {}\n", body.len()).into_bytes();
    for (k, v) in headers {
        out.extend_from_slice(format!("{k}: {v}\n").as_bytes());
    }
    out.push(b'\n');
    out.extend_from_slice(body);
    out
}

/// The reply of an invocation that offered a reply socket.
///
/// The command's ending still decides whether it answered: after exit 0 or
/// an exit code listed in `exit-status`, a reply sent on the socket is the
/// answer (stdout is ignored) and a malformed one is a 502; a command that
/// failed, timed out or was stopped gets the usual failure reply whatever
/// it sent. Without a reply on the socket, stdout is the answer as always.
/// The flag says whether the reply came from the socket (post plugins see
/// it as `via-reply-socket`).
pub fn settle(
    command: &CommandSpec,
    inv: &Invocation,
    run: &RunResult,
    sent: Option<Result<Reply, ReplyError>>,
) -> (Reply, bool) {
    let answered = !run.timed_out
        && !run.aborted
        && !run.output_overflow
        && run
            .exit_code
            .is_some_and(|c| c == 0 || command.reply.exit_status.contains_key(&c));
    match sent {
        Some(Ok(mut reply)) if answered => {
            if reply.header("content-type").is_none() {
                reply
                    .headers
                    .push(("content-type".into(), command.reply.content_type.clone()));
            }
            (reply, true)
        }
        Some(Err(e)) if answered => (
            problem::reply(
                502,
                "bad-reply",
                "Bad reply",
                &format!("the command's reply on the reply socket was refused: {e}"),
                &inv.request_id,
            ),
            false,
        ),
        _ => (crate::pipeline::shape_reply(command, inv, run), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8], limit: u64) -> Result<Reply, ReplyError> {
        read_frame(bytes, limit).await
    }

    #[tokio::test]
    async fn frames_are_binary_safe_and_exact() {
        let body: Vec<u8> = (0..=255u8).chain([b'\n', 0, b'\r']).collect();
        let frame = encode(
            201,
            &[("Content-Type", "application/octet-stream"), ("X-Id", "7")],
            &body,
        );
        let r = parse(&frame, 1024).await.unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.header("x-id"), Some("7"));
        assert_eq!(&r.body[..], &body[..]);
        // CRLF line ends are accepted; bytes after the body are not read.
        let r = parse(b"EXECD-REPLY/1 404 2\r\nA: b\r\n\r\nnoXXX", 10)
            .await
            .unwrap();
        assert_eq!((r.status, &r.body[..]), (404, &b"no"[..]));
    }

    #[tokio::test]
    async fn bad_frames_say_what_is_wrong() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "closed before anything was sent"),
            (
                b"HTTP/1.1 200 OK\n\n",
                "expected `EXECD-REPLY/1 <status> <body-length>`",
            ),
            (b"EXECD-REPLY/1 200\n\n", "as the first line"),
            (
                b"EXECD-REPLY/1 700 0\n\n",
                "status 700 is not between 200 and 599",
            ),
            (
                b"EXECD-REPLY/1 101 0\n\n",
                "status 101 is not between 200 and 599",
            ),
            (b"EXECD-REPLY/1 200 0\nno colon\n\n", "has no `:`"),
            (b"EXECD-REPLY/1 200 0\nA: b\x01\n\n", "control character"),
            (b"EXECD-REPLY/1 200 0\nA: b\n", "inside the header block"),
            (b"EXECD-REPLY/1 200 10\n\nshort", "5 of 10 body bytes"),
            (
                b"EXECD-REPLY/1 200 11\n\n",
                "11 bytes is over the limit of 10",
            ),
        ];
        for (bytes, needle) in cases {
            let e = parse(bytes, 10).await.unwrap_err().to_string();
            assert!(
                e.contains(needle),
                "{:?}: {e:?} lacks {needle:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let huge = format!("EXECD-REPLY/1 200 0\nX: {}\n\n", "a".repeat(70_000));
        let e = parse(huge.as_bytes(), 10).await.unwrap_err().to_string();
        assert!(e.contains("header block is over 65536 bytes"), "{e}");
    }

    #[tokio::test]
    async fn socket_lives_in_a_private_directory_and_goes_away() {
        use std::os::unix::fs::PermissionsExt;
        let s = ReplySocket::create(100, None, "t".into(), "r".into()).unwrap();
        let path = s.path().to_path_buf();
        let dir = path.parent().unwrap().to_path_buf();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let mut c = UnixStream::connect(&path).await.unwrap();
        c.write_all(&encode(200, &[], b"hi")).await.unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer, "OK\n");
        let reply = s.finish().await.unwrap().unwrap();
        assert_eq!(&reply.body[..], b"hi");
        assert!(!dir.exists(), "{} should be removed", dir.display());
    }

    #[tokio::test]
    async fn a_reply_sent_just_before_the_end_is_not_lost() {
        let s = ReplySocket::create(100, None, "t".into(), "r".into()).unwrap();
        // Connect and write with a blocking socket, then end at once: the
        // connection may not have been reported to the listener yet.
        let mut c = std::os::unix::net::UnixStream::connect(s.path()).unwrap();
        std::io::Write::write_all(&mut c, &encode(202, &[], b"late")).unwrap();
        let reply = s.finish().await.unwrap().unwrap();
        assert_eq!((reply.status, &reply.body[..]), (202, &b"late"[..]));
    }
}

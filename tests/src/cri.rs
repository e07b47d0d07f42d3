//! A containerd with the CRI plugin, and a small CRI client for it:
//! `runtime.v1.ImageService/PullImage` over containerd's socket, which is what kubelet calls to
//! pull a pod's image. gRPC by hand (one unary call: a 5-byte frame header and a few protobuf
//! fields), over HTTP/2 on the unix socket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{require, run_timeout};

/// containerd with the CRI plugin, its config at `<root>/etc/containerd/config.toml` (where
/// the agent checks it) and its hosts directory in the agent's root; state elsewhere.
pub struct CriContainerd {
    child: Option<Child>,
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
    log: PathBuf,
}

impl CriContainerd {
    pub fn start(root: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let config = root.join("etc/containerd/config.toml");
        std::fs::create_dir_all(config.parent().unwrap()).unwrap();
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{r}\"\nstate = \"{s}\"\n[grpc]\n  address = \"{sock}\"\n\
                 [ttrpc]\n  address = \"{sock}.ttrpc\"\n[debug]\n  address = \"\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\"]\n  stream_server_port = \"0\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{hosts}\"\n",
                r = d.join("root").display(),
                s = d.join("state").display(),
                sock = socket.display(),
                hosts = root.join("etc/containerd/certs.d").display(),
            ),
        )
        .unwrap();
        let log = d.join("containerd.log");
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(require("containerd"))
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        let c = CriContainerd {
            child: Some(child),
            _dir: dir,
            socket,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.socket.exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                c.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn ctr_pull(&self, hosts_dir: &Path, image: &str) -> std::process::Output {
        run_timeout(
            Command::new(require("ctr"))
                .arg("--address")
                .arg(&self.socket)
                .args(["image", "pull", "--hosts-dir"])
                .arg(hosts_dir)
                .arg(image),
            Duration::from_secs(60),
        )
    }
}

impl Drop for CriContainerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// A length-delimited protobuf field.
fn field(number: u8, bytes: &[u8], out: &mut Vec<u8>) {
    out.push(number << 3 | 2);
    varint(bytes.len(), out);
    out.extend_from_slice(bytes);
}

/// `PullImageRequest { image: ImageSpec { image }, auth: AuthConfig { username, password } }`.
/// kubelet (1.26) fills only username and password from a pod's pull secret, no
/// server_address, so containerd offers them to every host it tries, mirrors included.
fn pull_request(image: &str, auth: Option<(&str, &str)>) -> Vec<u8> {
    let mut spec = Vec::new();
    field(1, image.as_bytes(), &mut spec);
    let mut msg = Vec::new();
    field(1, &spec, &mut msg);
    if let Some((user, password)) = auth {
        let mut a = Vec::new();
        field(1, user.as_bytes(), &mut a);
        field(2, password.as_bytes(), &mut a);
        field(2, &a, &mut msg);
    }
    msg
}

/// The first string field of a protobuf message (`PullImageResponse.image_ref`).
fn first_string(msg: &[u8]) -> Option<String> {
    if msg.first() != Some(&0x0a) {
        return None;
    }
    let (mut len, mut shift, mut i) = (0usize, 0, 1);
    loop {
        let b = *msg.get(i)?;
        len |= ((b & 0x7f) as usize) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    String::from_utf8(msg.get(i..i + len)?.to_vec()).ok()
}

/// Pulls `image` through the CRI of the containerd listening on `socket`; returns the image
/// reference containerd reports (`sha256:...`), or the gRPC error.
pub fn pull_image(socket: &Path, image: &str, timeout: Duration) -> Result<String, String> {
    pull_image_as(socket, image, None, timeout)
}

/// [`pull_image`] with the pod's credentials (`username`, `password`), as kubelet sends them.
pub fn pull_image_as(
    socket: &Path,
    image: &str,
    auth: Option<(&str, &str)>,
    timeout: Duration,
) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        tokio::time::timeout(timeout, pull(socket, image, auth))
            .await
            .map_err(|_| format!("CRI PullImage of {image} did not answer in {timeout:?}"))?
    })
}

async fn pull(socket: &Path, image: &str, auth: Option<(&str, &str)>) -> Result<String, String> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("connect {}: {e}", socket.display()))?;
    let (client, conn) = h2::client::handshake(stream)
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(conn);
    let mut client = client.ready().await.map_err(|e| e.to_string())?;
    let req = http::Request::builder()
        .method("POST")
        .uri("http://localhost/runtime.v1.ImageService/PullImage")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|e| e.to_string())?;
    let (resp, mut send) = client.send_request(req, false).map_err(|e| e.to_string())?;
    let msg = pull_request(image, auth);
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend(msg);
    send.send_data(bytes::Bytes::from(frame), true)
        .map_err(|e| e.to_string())?;
    let resp = resp.await.map_err(|e| format!("PullImage: {e}"))?;
    let (parts, mut body) = resp.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.map_err(|e| e.to_string())?;
    // A failed call may be "trailers-only": the status then sits in the headers.
    let status_of = |h: &http::HeaderMap| {
        h.get("grpc-status").and_then(|v| v.to_str().ok()).map(|s| {
            let m = h
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            (s.to_owned(), m)
        })
    };
    let (status, message) = trailers
        .as_ref()
        .and_then(status_of)
        .or_else(|| status_of(&parts.headers))
        .ok_or("no grpc-status in the answer")?;
    if status != "0" {
        return Err(format!("grpc-status {status}: {message}"));
    }
    data.get(5..)
        .and_then(first_string)
        .ok_or_else(|| "PullImageResponse without image_ref".to_owned())
}

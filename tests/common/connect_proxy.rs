//! An HTTP CONNECT proxy on loopback, for tests of the clients that go
//! through one (bucket and registry upstreams, the registry CLI): it relays
//! tunnels, answers 502 when the target cannot be reached, and keeps each
//! request head; stopped when dropped.

#![allow(dead_code)] // each test file uses a different part of it

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct ConnectProxy {
    pub address: String,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ConnectProxy {
    pub async fn start() -> ConnectProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        let Ok(byte) = client.read_u8().await else { return };
                        head.push(byte);
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    seen.lock().unwrap().push(head.clone());
                    let target = head.strip_prefix("CONNECT ").and_then(|rest| rest.split(' ').next()).unwrap();
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else {
                        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                        return;
                    };
                    client.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        ConnectProxy { address, heads, task }
    }

    /// The head of every CONNECT request so far, in order.
    pub fn tunnels(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    /// The `HOST:PORT` of every CONNECT request so far, in order.
    pub fn targets(&self) -> Vec<String> {
        let target = |head: &String| head.strip_prefix("CONNECT ")?.split(' ').next().map(str::to_owned);
        self.tunnels().iter().filter_map(target).collect()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

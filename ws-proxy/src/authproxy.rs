//! VNC auth-proxy mode: ws-proxy logs in to the VNC server itself with the session's password
//! and offers the browser the "None" security type, so the VNC password never reaches the
//! browser (as nova's RFB security proxy does). RFB 3.8 handshake (RFC 6143 §7.1–7.2); the
//! browser side also accepts 3.7 and 3.3.
use futures_util::{SinkExt, Stream, StreamExt};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use vncdispatch_proto::vncauth::challenge_response;

/// Logs in to the VNC server on `tcp` with `password`; afterwards the server expects
/// ClientInit.
pub async fn login(tcp: &mut TcpStream, password: &str) -> Result<(), String> {
    let work = async {
        let mut version = [0u8; 12];
        tcp.read_exact(&mut version)
            .await
            .map_err(|e| format!("reading the server's version: {e}"))?;
        if !version.starts_with(b"RFB 003.") {
            return Err("the target is not an RFB server".to_owned());
        }
        tcp.write_all(b"RFB 003.008\n")
            .await
            .map_err(|e| e.to_string())?;
        let n = tcp.read_u8().await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!(
                "the server refused: {}",
                vncdispatch_proto::vencrypt::reason(tcp).await
            ));
        }
        let mut types = vec![0u8; n as usize];
        tcp.read_exact(&mut types)
            .await
            .map_err(|e| e.to_string())?;
        if !types.contains(&2) {
            return Err(format!(
                "the server does not offer VNC authentication (offers {types:?})"
            ));
        }
        tcp.write_u8(2).await.map_err(|e| e.to_string())?;
        let mut challenge = [0u8; 16];
        tcp.read_exact(&mut challenge)
            .await
            .map_err(|e| e.to_string())?;
        tcp.write_all(&challenge_response(password.as_bytes(), &challenge))
            .await
            .map_err(|e| e.to_string())?;
        match tcp.read_u32().await.map_err(|e| e.to_string())? {
            0 => Ok(()),
            _ => Err(format!(
                "the VNC server refused the session's password: {}",
                vncdispatch_proto::vencrypt::reason(tcp).await
            )),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| "VNC login timed out".to_owned())?
}

/// Plays the server's part of the handshake to the browser, offering only "None". Returns
/// any bytes the browser sent beyond the handshake (its ClientInit), to forward. With
/// `force_shared` (a share's viewer) the ClientInit is waited for and its shared flag set:
/// Xvnc disconnects every other client for a full-control login asking for exclusive
/// access, and a viewer must never knock the owner off.
pub async fn present_none<S, E>(ws: &mut S, force_shared: bool) -> Result<Vec<u8>, String>
where
    S: Stream<Item = Result<Message, E>> + futures_util::Sink<Message> + Unpin,
    E: std::fmt::Display,
{
    let mut buf = Vec::new();
    let send = |m: Vec<u8>| Message::Binary(m.into());
    ws.send(send(b"RFB 003.008\n".to_vec()))
        .await
        .map_err(|_| "browser went away".to_owned())?;
    fill(ws, &mut buf, 12).await?;
    let minor = match &buf[..12] {
        b"RFB 003.008\n" => 8,
        b"RFB 003.007\n" => 7,
        v if v.starts_with(b"RFB 003.") => 3,
        _ => return Err("the browser did not speak RFB".into()),
    };
    buf.drain(..12);
    if minor == 3 {
        // 3.3: the server picks the type.
        ws.send(send(1u32.to_be_bytes().to_vec()))
            .await
            .map_err(|_| "browser went away".to_owned())?;
    } else {
        ws.send(send(vec![1, 1]))
            .await
            .map_err(|_| "browser went away".to_owned())?;
        fill(ws, &mut buf, 1).await?;
        if buf[0] != 1 {
            return Err(format!("the browser chose security type {}", buf[0]));
        }
        buf.drain(..1);
        if minor == 8 {
            ws.send(send(0u32.to_be_bytes().to_vec()))
                .await
                .map_err(|_| "browser went away".to_owned())?;
        }
    }
    if force_shared {
        fill(ws, &mut buf, 1).await?;
        buf[0] = 1;
    }
    Ok(buf)
}

async fn fill<S, E>(ws: &mut S, buf: &mut Vec<u8>, n: usize) -> Result<(), String>
where
    S: Stream<Item = Result<Message, E>> + Unpin,
    E: std::fmt::Display,
{
    while buf.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
        match next {
            Ok(Some(Ok(Message::Binary(b)))) => buf.extend_from_slice(&b),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(Some(Ok(_))) => return Err("unexpected message during the RFB handshake".into()),
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(None) => return Err("browser went away".into()),
            Err(_) => return Err("the browser's RFB handshake timed out".into()),
        }
    }
    Ok(())
}

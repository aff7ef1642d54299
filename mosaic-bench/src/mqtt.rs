//! The least of MQTT 3.1.1 a baseline client needs, over a WebSocket: CONNECT /
//! CONNACK, SUBSCRIBE / SUBACK, PINGREQ / PINGRESP, and reading PUBLISH (QoS 0).
//!
//! RabbitMQ's Web-MQTT plugin serves MQTT over WebSocket at `ws://host:port/ws` with
//! the subprotocol `mqtt`, one MQTT packet per binary message. A crate would bring a
//! client state machine, persistence and TLS the baseline has no use for; these few
//! encoders and a packet reader keep the client as thin as the gateway's test client,
//! so both sides of the comparison pay the same on the load side.

/// Packet types (the high nibble of the first byte).
const CONNECT: u8 = 0x10;
const CONNACK: u8 = 0x20;
const PUBLISH: u8 = 0x30;
const SUBSCRIBE: u8 = 0x82; // type 8 with the reserved flags 0b0010
const SUBACK: u8 = 0x90;
const PINGREQ: u8 = 0xC0;
const PINGRESP: u8 = 0xD0;

/// A packet the client reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNACK with its return code (0: accepted).
    ConnAck(u8),
    /// SUBACK: the packet id and the granted QoS of each filter (0x80: refused).
    SubAck(u16, Vec<u8>),
    /// PUBLISH: topic and payload.
    Publish(String, Vec<u8>),
    /// PINGRESP.
    PingResp,
    /// Any other packet type (its first byte).
    Other(u8),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_remaining_length(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            break;
        }
    }
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    put_remaining_length(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// CONNECT with a clean session, the given keep-alive (0: none) and credentials.
pub fn connect(client_id: &str, user: &str, password: &str, keep_alive_secs: u16) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, "MQTT");
    body.push(4); // protocol level 3.1.1
    body.push(0x80 | 0x40 | 0x02); // user name, password, clean session
    body.extend_from_slice(&keep_alive_secs.to_be_bytes());
    put_str(&mut body, client_id);
    put_str(&mut body, user);
    put_str(&mut body, password);
    packet(CONNECT, &body)
}

/// SUBSCRIBE to one topic filter at QoS 0.
pub fn subscribe(packet_id: u16, filter: &str) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    put_str(&mut body, filter);
    body.push(0);
    packet(SUBSCRIBE, &body)
}

/// PINGREQ.
pub fn pingreq() -> Vec<u8> {
    vec![PINGREQ, 0]
}

/// Reads the packets in `buf` (the bytes of one or more WebSocket messages), leaving
/// an incomplete one in place. `None` when the bytes cannot be MQTT.
pub fn read(buf: &mut Vec<u8>) -> Option<Vec<Packet>> {
    let mut packets = Vec::new();
    while let Some(&first) = buf.first() {
        // Remaining length: at most four bytes of seven bits each.
        let mut len = 0usize;
        let mut shift = 0;
        let mut at = 1;
        let complete_header = loop {
            let Some(&b) = buf.get(at) else { break false };
            len |= ((b & 0x7f) as usize) << shift;
            at += 1;
            if b & 0x80 == 0 {
                break true;
            }
            shift += 7;
            if shift > 21 {
                return None;
            }
        };
        if !complete_header || buf.len() < at + len {
            break;
        }
        let body: Vec<u8> = buf[at..at + len].to_vec();
        buf.drain(..at + len);
        packets.push(decode(first, &body)?);
    }
    Some(packets)
}

fn decode(first: u8, body: &[u8]) -> Option<Packet> {
    Some(match first & 0xF0 {
        CONNACK => Packet::ConnAck(*body.get(1)?),
        SUBACK => {
            let id = u16::from_be_bytes([*body.first()?, *body.get(1)?]);
            Packet::SubAck(id, body.get(2..)?.to_vec())
        }
        PUBLISH => {
            let n = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
            let topic = String::from_utf8_lossy(body.get(2..2 + n)?).into_owned();
            // QoS 1 and 2 carry a packet id after the topic.
            let skip = if first & 0x06 != 0 { 2 } else { 0 };
            Packet::Publish(topic, body.get(2 + n + skip..)?.to_vec())
        }
        PINGRESP => Packet::PingResp,
        _ => Packet::Other(first),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_is_well_formed() {
        let p = connect("c1", "guest", "guest", 0);
        assert_eq!(p[0], 0x10);
        assert_eq!(p[1] as usize, p.len() - 2);
        assert_eq!(&p[2..8], b"\x00\x04MQTT");
        assert_eq!(p[8], 4);
        assert_eq!(p[9], 0xC2);
    }

    #[test]
    fn long_remaining_lengths_take_several_bytes() {
        let mut out = Vec::new();
        put_remaining_length(&mut out, 321);
        assert_eq!(out, [0xC1, 0x02]);
    }

    #[test]
    fn reads_whole_packets_and_keeps_a_partial_one() {
        let mut buf = vec![0x20, 0x02, 0x00, 0x00, 0x90, 0x03, 0x00, 0x01, 0x00, 0xD0];
        let packets = read(&mut buf).unwrap();
        assert_eq!(
            packets,
            [Packet::ConnAck(0), Packet::SubAck(1, vec![0])],
            "two whole packets"
        );
        assert_eq!(buf, [0xD0], "the partial PINGRESP stays");
        buf.push(0x00);
        assert_eq!(read(&mut buf).unwrap(), [Packet::PingResp]);
        let mut publish = packet(0x30, &[0, 3, b'a', b'/', b'b', b'h', b'i']);
        assert_eq!(
            read(&mut publish).unwrap(),
            [Packet::Publish("a/b".into(), b"hi".to_vec())]
        );
        assert_eq!(subscribe(7, "t")[0], 0x82);
        assert_eq!(pingreq(), [0xC0, 0]);
    }
}

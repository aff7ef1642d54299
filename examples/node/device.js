#!/usr/bin/env node
// A Mosaic device in Node.js (npm package `ws`).
//
// Connects with a device token in the Authorization header, sends events with ids and
// waits for their acks, answers requests, and reconnects with exponential backoff and
// jitter. Unacked events are sent again after a reconnect with the same id, so the
// gateway gives them the same message_id and Hive can drop the duplicate.
//
//   npm ci
//   MOSAIC_URL=ws://127.0.0.1:8080/v1/connect MOSAIC_TOKEN=<jwt> node device.js
//   node device.js --events 3 --exit   # send 3 events, wait for 3 acks,
//                                      # answer one request, exit 0
//   node device.js --service reboot --service read-config
//                                      # declare what it offers: the gateway
//                                      # refuses other requests (404)
'use strict';
const crypto = require('node:crypto');
const WebSocket = require('ws');

function option(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}
const url = option('url', process.env.MOSAIC_URL || 'ws://127.0.0.1:8080/v1/connect');
const token = option('token', process.env.MOSAIC_TOKEN);
const events = Number(option('events', '0')); // 0: one every --interval, forever
const intervalMs = Number(option('interval', '1')) * 1000;
const exitWhenDone = process.argv.includes('--exit');
const timeoutS = Number(option('timeout', '0'));
// --service NAME, repeatable: the request names this device answers.
const services = process.argv.flatMap((a, i) =>
  (a === '--service' && i + 1 < process.argv.length ? [process.argv[i + 1]] : []));
if (!token) {
  console.error('set MOSAIC_TOKEN or pass --token');
  process.exit(64);
}
if (timeoutS > 0) {
  setTimeout(() => { console.error('timed out'); process.exit(1); }, timeoutS * 1000).unref();
}

// Close codes after which reconnecting would not help.
const STOP = { 4409: 'replaced by a newer connection', 4403: 'token names another device',
  4401: 'token refused or expired: get a new one' };
const run = crypto.randomUUID().slice(0, 8); // ids stay unique across restarts
const unacked = new Map(); // id -> frame, resent after a reconnect
let seq = 0, acked = 0, answered = 0, backoff = 0;

const done = () => exitWhenDone && seq >= events && acked >= events && answered >= 1;

function connect() {
  const ws = new WebSocket(url, { headers: { Authorization: `Bearer ${token}` } });
  let timer = null;

  ws.on('unexpected-response', (req, res) => {
    console.error(`upgrade refused: HTTP ${res.statusCode}`);
    process.exit(res.statusCode === 401 ? 3 : 1);
  });
  ws.on('message', (text) => {
    const frame = JSON.parse(text);
    switch (frame.type) {
      case 'welcome':
        console.log(`connected as ${frame.device} (session ${frame.session})`);
        backoff = 0; // reset once connected
        if (services.length > 0) { // declare what this device offers
          ws.send(JSON.stringify({ type: 'register', services, attributes: { client: 'node' } }));
        }
        for (const f of unacked.values()) ws.send(JSON.stringify(f));
        timer = setInterval(() => sendEvent(ws), intervalMs);
        sendEvent(ws);
        break;
      case 'ack':
        if (unacked.delete(frame.id)) acked += 1;
        console.log(`<- ack ${frame.id}`);
        break;
      case 'nack': // not stored: keep it, it is sent again after a reconnect
        console.log(`<- nack ${frame.id} (${frame.code})`);
        break;
      case 'request':
        console.log(`<- request ${frame.name} ${JSON.stringify(frame.data)}`);
        ws.send(JSON.stringify({ type: 'response', request_id: frame.id, status: 'ok',
          data: { echo: frame.data, by: 'node' } }));
        answered += 1;
        break;
      case 'event':
        console.log(`<- event ${frame.name} ${JSON.stringify(frame.data)}`);
        break;
      case 'registered':
        console.log(`<- registered ${JSON.stringify(frame.services)}`);
        break;
      case 'error':
        console.log(`<- error ${frame.code}: ${frame.message}`);
        break;
    }
    if (done()) ws.close(1000, 'done');
  });
  ws.on('error', (err) => console.error(`connection error: ${err.message}`));
  ws.on('close', (code) => {
    clearInterval(timer);
    if (done()) process.exit(0);
    if (STOP[code]) {
      console.error(`closed ${code}: ${STOP[code]}; not reconnecting`);
      process.exit(2);
    }
    let wait;
    if (code === 1001) { // gateway going away: come back soon, to another replica
      wait = Math.random() * 500;
    } else { // exponential backoff with equal jitter, 250 ms to 30 s
      backoff = Math.min(30000, Math.max(250, backoff * 2));
      wait = backoff / 2 + Math.random() * (backoff / 2);
    }
    console.log(`closed (${code}); reconnecting in ${Math.round(wait)} ms`);
    setTimeout(connect, wait);
  });
}

function sendEvent(ws) {
  if (events > 0 && seq >= events) return;
  seq += 1;
  const id = `${run}-${seq}`;
  const frame = { type: 'event', id, name: 'telemetry',
    data: { seq, temp: Math.round((18 + Math.random() * 8) * 10) / 10 } };
  unacked.set(id, frame);
  ws.send(JSON.stringify(frame));
  console.log(`-> event ${id}`);
}

connect();

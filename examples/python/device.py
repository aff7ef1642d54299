#!/usr/bin/env python3
"""A Mosaic device in Python (library: websockets >= 13).

Connects with a device token in the Authorization header, sends events with ids and
waits for their acks, answers requests, and reconnects with exponential backoff and
jitter. Unacked events are sent again after a reconnect with the same id, so the
gateway gives them the same message_id and Hive can drop the duplicate.

    pip install websockets
    MOSAIC_URL=ws://127.0.0.1:8080/v1/connect MOSAIC_TOKEN=<jwt> python3 device.py
    python3 device.py --events 3 --exit   # send 3 events, wait for 3 acks,
                                          # answer one request, exit 0
    python3 device.py --service reboot --service read-config
                                          # declare what it offers: the gateway
                                          # refuses other requests (404)
"""
import argparse, asyncio, json, os, random, sys, uuid

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

STOP_CODES = {4409: "replaced by a newer connection", 4403: "token names another device",
              4401: "token refused or expired: get a new one"}


class Device:
    def __init__(self, args):
        self.args = args
        self.run = uuid.uuid4().hex[:8]       # ids stay unique across restarts
        self.seq = 0
        self.unacked = {}                     # id -> frame, resent after a reconnect
        self.acked = 0
        self.answered = 0

    def done(self):
        a = self.args
        return a.exit and self.seq >= a.events and self.acked >= a.events and self.answered >= 1

    async def session(self, ws):
        welcome = json.loads(await ws.recv())
        if welcome.get("type") != "welcome":
            raise RuntimeError(f"expected welcome, got {welcome}")
        print(f"connected as {welcome['device']} (session {welcome['session']})", flush=True)
        if self.args.service:   # declare what this device offers
            await ws.send(json.dumps({"type": "register", "services": self.args.service,
                                      "attributes": {"client": "python"}}))
        for frame in list(self.unacked.values()):   # resend what was not acked
            await ws.send(json.dumps(frame))
        sender = asyncio.create_task(self.send_events(ws))
        try:
            async for text in ws:
                await self.on_frame(ws, json.loads(text))
                if self.done():
                    await ws.close(1000, "done")
                    return
        finally:
            sender.cancel()

    async def send_events(self, ws):
        while self.args.events == 0 or self.seq < self.args.events:
            self.seq += 1
            event_id = f"{self.run}-{self.seq}"
            frame = {"type": "event", "id": event_id, "name": "telemetry",
                     "data": {"seq": self.seq, "temp": round(random.uniform(18, 26), 1)}}
            self.unacked[event_id] = frame
            await ws.send(json.dumps(frame))
            print(f"-> event {event_id}", flush=True)
            await asyncio.sleep(self.args.interval)

    async def on_frame(self, ws, frame):
        kind = frame.get("type")
        if kind == "ack":
            if self.unacked.pop(frame["id"], None) is not None:
                self.acked += 1
            print(f"<- ack {frame['id']}", flush=True)
        elif kind == "nack":   # not stored: keep it, it is sent again after a reconnect
            print(f"<- nack {frame['id']} ({frame['code']})", flush=True)
        elif kind == "request":
            print(f"<- request {frame['name']} {json.dumps(frame.get('data'))}", flush=True)
            answer = {"type": "response", "request_id": frame["id"], "status": "ok",
                      "data": {"echo": frame.get("data"), "by": "python"}}
            await ws.send(json.dumps(answer))
            self.answered += 1
        elif kind == "event":
            print(f"<- event {frame['name']} {json.dumps(frame.get('data'))}", flush=True)
        elif kind == "registered":
            print(f"<- registered {json.dumps(frame.get('services'))}", flush=True)
        elif kind == "error":
            print(f"<- error {frame['code']}: {frame['message']}", flush=True)

    async def run_forever(self):
        headers = {"Authorization": f"Bearer {self.args.token}"}
        delay, base, cap = 0.0, 0.25, 30.0
        while True:
            code = None
            try:
                async with connect(self.args.url, additional_headers=headers) as ws:
                    delay = 0.0                       # reset the backoff once connected
                    await self.session(ws)
                    if self.done():
                        return 0
                code = ws.close_code               # a clean close ends the loop quietly
            except InvalidStatus as e:
                if e.response.status_code == 401:
                    print("token refused (HTTP 401)", file=sys.stderr)
                    return 3
                print(f"upgrade failed: HTTP {e.response.status_code}", file=sys.stderr)
            except ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd else None
            except OSError as e:
                print(f"cannot connect: {e}", file=sys.stderr)
            if code in STOP_CODES:
                print(f"closed {code}: {STOP_CODES[code]}; not reconnecting", file=sys.stderr)
                return 2
            if code == 1001:                        # gateway going away: come back soon
                wait = random.uniform(0, 0.5)
            else:                                   # exponential backoff, equal jitter
                delay = min(cap, max(base, delay * 2))
                wait = delay / 2 + random.uniform(0, delay / 2)
            print(f"closed ({code}); reconnecting in {wait:.2f}s", flush=True)
            await asyncio.sleep(wait)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=os.environ.get("MOSAIC_URL", "ws://127.0.0.1:8080/v1/connect"))
    p.add_argument("--token", default=os.environ.get("MOSAIC_TOKEN"))
    p.add_argument("--events", type=int, default=0, help="events to send (0: one every --interval forever)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between events")
    p.add_argument("--exit", action="store_true", help="exit 0 after all acks and one answered request")
    p.add_argument("--timeout", type=float, default=0, help="give up (exit 1) after this many seconds")
    p.add_argument("--service", action="append", default=[],
                   help="a request name this device answers (repeat); others are refused by the gateway")
    args = p.parse_args()
    if not args.token:
        p.error("set MOSAIC_TOKEN or pass --token")

    async def bounded():
        run = Device(args).run_forever()
        return await (asyncio.wait_for(run, args.timeout) if args.timeout else run)
    try:
        sys.exit(asyncio.run(bounded()))
    except asyncio.TimeoutError:
        print("timed out", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

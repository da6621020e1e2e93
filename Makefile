# tartan — build, test and demo from a fresh Debian machine.
#
#   make demo   install what is missing, build, run a 3-node cluster in network namespaces
#               and print the netbench report (everything is removed afterwards)
#   make test   install what is missing, check formatting and lints, run every test
#   make bench  run the benchmarks recorded in docs/benchmarks.md

SHELL := /bin/bash
CARGO ?= cargo
# Debian packages the build, the tests and the demo need (libprotobuf-dev: etcd-client's build
# runs protoc, which needs google/protobuf/descriptor.proto; protobuf-compiler does not bring
# it with --no-install-recommends; conntrack: only netns-tests/conntrack.rs checks with
# `conntrack -L`, tartand deletes entries over netlink). `make deps` asks dpkg about the
# whole list, so a package added here is installed on machines that already have the others.
# nsd, dnsmasq-base and dnsperf are the cluster DNS benchmark's references and client
# (benches/dns.rs starts its own NSD in a lab namespace); dnsutils (dig) is what the DNS
# tests ask with, and dnsmasq their upstream resolver. nginx-light and wrk are the ingress
# benchmark's reference and client; curl and chromium (headless) the ingress tests' clients.
# Packages are installed with a policy-rc.d that keeps their services (etcd,
# NSD) from starting in the root namespace: every test and bench starts its own in a lab.
DEB_PACKAGES := etcd-server etcd-client nftables iproute2 iptables protobuf-compiler \
	libprotobuf-dev conntrack containernetworking-plugins podman runc busybox-static \
	openssl util-linux procps ca-certificates musl-tools nsd dnsmasq-base dnsperf dnsutils \
	curl nginx-light wrk chromium python3-grpcio
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
TARGET_DIR := $(abspath $(or $(CARGO_TARGET_DIR),target))

.PHONY: all deps build release test unit netns lint demo bench clean

all: build

deps:
	@missing=$$(dpkg-query -W -f='$${db:Status-Abbrev} $${Package}\n' $(DEB_PACKAGES) 2>/dev/null | \
	  awk '$$1 == "ii" { ok[$$2] = 1 } END { n = split("$(DEB_PACKAGES)", p, " "); \
	    for (i = 1; i <= n; i++) if (!(p[i] in ok)) printf "%s ", p[i] }'); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  policy=; if [ ! -e /usr/sbin/policy-rc.d ]; then policy=1; \
	    printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee /usr/sbin/policy-rc.d >/dev/null; \
	    $(SUDO) chmod 755 /usr/sbin/policy-rc.d; fi; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  rc=$$?; [ -z "$$policy" ] || $(SUDO) rm -f /usr/sbin/policy-rc.d; \
	  if [[ " $$missing " == *" nsd "* ]] && [ -d /run/systemd/system ]; then \
	    $(SUDO) systemctl disable --now nsd.service >/dev/null 2>&1 || true; \
	  fi; \
	  [ $$rc = 0 ] || exit $$rc; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "cargo is missing: install Rust (https://rustup.rs)"; exit 1; }

build: deps
	$(CARGO) build --all-targets

# tartan-cni is exec'd once per pod operation, so its start-up is on every pod's clock. It is
# built for musl, statically, not position-independent and with whole-program optimization
# (Cargo profile `cni`): glibc's start-up alone costs ~0.45 ms per exec on these VMs (its CPU
# feature and cache detection runs ~60 CPUID instructions, each trapped by the hypervisor,
# ~7 us apiece); musl runs none, the static non-PIE link leaves no loader or relocation work,
# and LTO leaves ~90 fewer pages to fault in per call (docs/benchmarks.md, CNI section).
# The musl target comes from rustup; without it the plugin is linked statically with glibc
# instead (slower start, same behaviour). Either way it ends up in target/release/, built
# without the `lab` feature (the netns lab and netbench are not linked into the plugin).
MUSL := x86_64-unknown-linux-musl
release: deps
	$(CARGO) build --release --bins
	@if { rustup target list --installed 2>/dev/null | grep -qx $(MUSL) || rustup target add $(MUSL); } && \
	    echo "$(CARGO) rustc --profile cni --target $(MUSL) --no-default-features --bin tartan-cni -- -C relocation-model=static" && \
	    $(CARGO) rustc --profile cni --target $(MUSL) --no-default-features --bin tartan-cni -- -C relocation-model=static; then \
	  cp --remove-destination $(TARGET_DIR)/$(MUSL)/cni/tartan-cni $(TARGET_DIR)/release/tartan-cni; \
	else \
	  echo "warning: no musl build of tartan-cni (target $(MUSL) or musl-gcc missing); linking it statically with glibc"; \
	  $(CARGO) rustc --release --no-default-features --bin tartan-cni -- -C target-feature=+crt-static -C relocation-model=static; \
	fi

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

unit: deps
	$(CARGO) test --lib --bins

# The netns tests need root; they create and remove their own namespaces and etcd.
netns: deps
	$(CARGO) test --tests -- --test-threads=$${TEST_THREADS:-2}

# After a passing run nothing of tartan's may remain outside the build directory
# (netns-tests/leftovers.sh compares with what existed before; a failed test may keep its logs).
test: lint
	@snap=$$(mktemp); bash netns-tests/leftovers.sh snapshot $$snap && \
	$(CARGO) test --lib --bins --tests -- --test-threads=$${TEST_THREADS:-2} && \
	bash netns-tests/leftovers.sh check $$snap

# The demo needs working binaries, not the fastest ones: Cargo profile `demo` (release at
# opt-level 1, no debug info) compiles in about two thirds of the CPU time of `release`; the
# tartan crate is most of it. netbench's figures are the kernel's paths, and the demo's
# p50s match a release build's (docs/benchmarks.md, "Newcomer"); `make release` builds the
# production binaries and the fat-LTO musl plugin, which took 3 min 47 s of a 6.5 min demo.
demo: deps
	$(CARGO) build --profile demo --bins
	@snap=$$(mktemp); bash netns-tests/leftovers.sh snapshot $$snap && \
	$(TARGET_DIR)/demo/netbench demo --out-dir $(TARGET_DIR)/demo-report && \
	bash netns-tests/leftovers.sh check $$snap

# cargo bench relinks tartan-cni dynamically for its own use; the CNI benchmark measures the
# static build that `make release` produces (and tartand installs).
bench: release
	cp $(TARGET_DIR)/release/tartan-cni $(TARGET_DIR)/release/tartan-cni-static
	TARTAN_CNI_BIN=$(TARGET_DIR)/release/tartan-cni-static $(CARGO) bench

clean:
	$(CARGO) clean

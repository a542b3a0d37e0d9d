# ABUSE entry points. `make test` is what CI runs.
SHELL := /bin/bash
SCENARIO ?=
FLAVOR ?= test

.PHONY: all deps bench-deps rbd-deps kernel kernel-bench driver host-test vm-test test demo bench profile lint clean install install-test rbd-test deb

all: driver
	cargo build --workspace --release

## Install every tool the build and tests need (idempotent).
deps:
	scripts/deps.sh

## The peers make bench compares with: rublk, nbdkit, nbd-client (idempotent).
bench-deps: deps
	scripts/bench-deps.sh

## Ceph (monitor, OSD, the rbd tool, librbd) for make rbd-test (idempotent).
rbd-deps: deps
	scripts/rbd-deps.sh

## Build the guest kernels (cached outside the checkout, keyed by config).
kernel: deps
	scripts/kernel.sh build test

kernel-bench: deps
	scripts/kernel.sh build bench

## Build the module against the test kernel; prints the .ko path.
driver: kernel
	tests/vm/build-module.sh $(FLAVOR)

## Host tests: uapi layout against the C header, parsing, backends. The cow
## working areas go to a directory of their own, which must end empty: a
## test that leaves one behind (a server never stopped) fails the run.
host-test:
	work=$$(mktemp -d /dev/shm/abuse-host-test.XXXXXX); \
	  ABUSE_COW_WORKDIR=$$work cargo test --workspace; rc=$$?; \
	  left=$$(ls -A $$work); rm -rf $$work; \
	  if [ -n "$$left" ]; then echo "host-test: cow working areas left behind: $$left" >&2; exit 1; fi; \
	  exit $$rc

## The VM suite (all scenarios, or SCENARIO=name[,name]).
vm-test: kernel
	tests/vm/run.sh --flavor test $(if $(SCENARIO),--scenario $(SCENARIO))

## Everything: host tests, the rbd tests, the install layout, the VM suite.
test: deps
	$(MAKE) host-test
	$(MAKE) rbd-test
	$(MAKE) install-test
	$(MAKE) vm-test

## Run it: boot the VM, serve a 1 GiB file-backed device, use it, measure it.
demo: deps kernel
	tests/vm/run.sh --flavor test --script tests/vm/demo.sh --timeout 900

## fio on ABUSE's servers next to null_blk, loop, ublk and nbd, and qcow2
## against rublk in 12 conditions, each job interleaved A B B A across the
## devices compared, in one boot of the benchmark kernel (BENCH_RUNS boots:
## medians); a table with ratios and their spread, the targets judged on
## their worst condition, target/bench/bench.json and target/bench/bench.png.
## The virtio disk (2 GiB) holds the 1 GiB qcow2 images of the virtio runs.
BENCH_RUNS ?= 3
bench: deps bench-deps kernel-bench
	mkdir -p target/bench
	for i in $$(seq $(BENCH_RUNS)); do \
	  rm -f target/bench/run-$$i.log; ABUSE_VM_LOG=target/bench/run-$$i.log tests/vm/run.sh --flavor bench --script tests/vm/bench.sh --timeout 1500 --disk 2048 || exit 1; \
	done
	cargo run --quiet --release -p abuse-bench -- $$(seq -f 'target/bench/run-%g.log' $(BENCH_RUNS)) \
	  --json target/bench/bench.json --png target/bench/bench.png

## Where the 4k random jobs' time goes (perf, every CPU) on null_blk, ublk
## null and ABUSE null, in one boot of the profiling kernel (bench + perf
## events and symbols); the reports go to target/bench/profile.log.
profile: deps bench-deps
	scripts/kernel.sh build profile
	mkdir -p target/bench
	ABUSE_VM_LOG=target/bench/profile.log tests/vm/run.sh --flavor profile --script tests/vm/profile.sh --timeout 1200

## The rbd backend against a one-node Ceph cluster on this machine
## (memstore OSD, 127.0.0.1 only), torn down afterwards.
CEPH_DIR ?= /tmp/abuse-ceph
rbd-test: rbd-deps
	cargo build --workspace --tests
	scripts/ceph-one-node.sh start $(CEPH_DIR) >/dev/null
	ABUSE_RBD_CONF=$(CEPH_DIR)/ceph.conf cargo test -p abuse-servers --test conformance rbd -- --ignored; \
	  rc=$$?; scripts/ceph-one-node.sh stop $(CEPH_DIR); exit $$rc

## Install on this machine: abusectl, man pages, completions, udev rule,
## modules-load entry, abuse-server@.service, and the module for KDIR's
## kernel (default: the running one) if it can build Rust modules.
PREFIX ?= /usr/local
KDIR ?= /lib/modules/$(shell uname -r)/build
install:
	scripts/install.sh "$(DESTDIR)" "$(PREFIX)" "$(KDIR)"

## The install layout in a scratch root, against the test kernel (from a
## plain shell: the kernel's own rustc found from its tree); the unit checked
## by systemd-analyze verify; the module built by DKMS for the test kernel.
install-test: kernel
	tests/install-test.sh

## The Debian package: target/deb/abuse_VERSION_ARCH.deb (abusectl, man
## pages, completions, unit, udev rule, and the module's DKMS source).
deb: deps
	scripts/deb.sh

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

clean:
	cargo clean

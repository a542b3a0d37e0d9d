# ABUSE entry points. `make test` is what CI runs.
SHELL := /bin/bash
SCENARIO ?=
FLAVOR ?= test

.PHONY: all deps kernel kernel-bench driver host-test vm-test test demo bench lint clean

all: driver
	cargo build --workspace --release

## Install every tool the build and tests need (idempotent).
deps:
	scripts/deps.sh

## Build the guest kernels (cached outside the checkout, keyed by config).
kernel: deps
	scripts/kernel.sh build test

kernel-bench: deps
	scripts/kernel.sh build bench

## Build the module against the test kernel; prints the .ko path.
driver: kernel
	tests/vm/build-module.sh $(FLAVOR)

## Host tests: uapi layout against the C header, parsing, backends.
host-test:
	cargo test --workspace

## The VM suite (all scenarios, or SCENARIO=name[,name]).
vm-test: kernel
	tests/vm/run.sh --flavor test $(if $(SCENARIO),--scenario $(SCENARIO))

## Everything: host tests, then the VM suite.
test: deps
	$(MAKE) host-test
	$(MAKE) vm-test

## Run it: boot the VM, serve a 1 GiB file-backed device, use it, measure it.
demo: deps kernel
	tests/vm/run.sh --flavor test --script tests/vm/demo.sh --timeout 900

## fio on ABUSE next to loop and null_blk, on the benchmark kernel.
bench: deps kernel-bench
	tests/vm/run.sh --flavor bench --script tests/vm/bench.sh --timeout 1500 --disk 1024

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

clean:
	cargo clean

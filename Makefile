# ABUSE entry points. `make test` is what CI runs.
SHELL := /bin/bash
SCENARIO ?=
FLAVOR ?= test

.PHONY: all deps kernel kernel-bench driver host-test vm-test test lint clean

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

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

clean:
	cargo clean

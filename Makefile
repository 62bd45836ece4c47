# Convenience targets; each is one script in scripts/.
.PHONY: demo test bench fuzz soak build release

build:
	scripts/setup.sh

demo:
	scripts/demo.sh

test:
	scripts/test.sh

bench:
	scripts/bench.sh

fuzz:
	scripts/fuzz.sh 60

soak:
	scripts/soak.sh 180 64

release:
	scripts/release.sh

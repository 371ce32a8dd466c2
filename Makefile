# Thin wrappers over ./quickstart, which installs what is missing first.
.PHONY: run test bench bootstrap
run:
	./quickstart run $(ARGS)
test:
	./quickstart test $(ARGS)
bench:
	./quickstart bench $(ARGS)
bootstrap:
	sh scripts/bootstrap

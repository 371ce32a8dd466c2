# Thin wrappers over ./quickstart, which installs what is missing first.
.PHONY: run test bench bootstrap deb
run:
	./quickstart run $(ARGS)
test:
	./quickstart test $(ARGS)
# `make bench crash` runs one bench: the words after `bench` name it.
bench:
	./quickstart bench $(filter-out bench,$(MAKECMDGOALS)) $(ARGS)
ifneq ($(filter bench,$(MAKECMDGOALS)),)
$(filter-out bench,$(MAKECMDGOALS)):
	@:
endif
bootstrap:
	sh scripts/bootstrap
# The .deb, built with dpkg-buildpackage -us -uc -b (build dependencies come
# from Debian) and checked with lintian; it lands in build/deb/.
deb:
	sh scripts/build-deb

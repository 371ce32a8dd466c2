"""Every collector unit vajrad can run, in start-up order. Adding a unit is
one line here (its declaration lives in its own package)."""
from vajrad.collectors import alerts, containers, fim, logs, process, products, socket
from vajrad.config import Catalogue
from vajrad.units import Unit

UNITS: tuple[Unit, ...] = (
    containers.UNIT,        # first: the others fill their container columns from its resolver
    process.UNIT,
    socket.UNIT,
    fim.BPF_FILE_EVENTS,
    fim.FILE_EVENTS,
    logs.UNIT,
    products.UNIT,
    alerts.UNIT,
)

# Every option and config section: the daemon's own and the units'.
CATALOGUE = Catalogue(UNITS)

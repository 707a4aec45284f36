"""One module (or package) per command that is more than a call into the library: byot test, bench, sweep
and tune. The command line (``byot.cli``) calls these; they call everything below them."""

"""Bundle writer: manifest, report.html (``report``), hand-off README (``handoff``), FLOP counts (``flops``)."""

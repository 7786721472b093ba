"""``python -m benchmarks``: run the benchmarks and print one table of ratios."""

from benchmarks.run import main

raise SystemExit(main())

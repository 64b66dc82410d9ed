"""The compile core: the one sequence of stages every front end runs (``stages``), the options they
share (``options``) and the result they extend (``result``)."""

"""Example processors for ``INVOICER_PROCESSOR``: starting points for real deployments.

``invoicer.examples.http:process`` posts each invoice to an HTTP service (it needs the network drop-in,
``/usr/share/doc/invoicer/examples/network.conf``; see the README, "Processors that need the network").
"""

"""The one package that speaks Redis streams: publishing, consumer groups, retry, dead letters.

Delivery is at-least-once. A handler that returns has its entry acked, and its message id marked
done (so a re-sent id is carried out at most once; periodic messages such as health reports get
no marker). Entries settle together at the end of their batch, in one round trip; a handler that
returned messages to publish has its entry settled at once, in one transaction with them: those
are never lost nor doubled around a crash. A handler that raises leaves the entry pending, to be
re-claimed after ``claim_min_idle_ms`` by this or another consumer. Entries that cannot be
decoded, or were delivered ``max_deliveries`` times, go to the dead-letter stream.
"""

from sage_mq.bus.consumer import Consumer, Handler
from sage_mq.bus.group import DEAD_EXCERPT_CHARS, Delivery, Outgoing
from sage_mq.bus.streams import Bus, Entry

__all__ = ["DEAD_EXCERPT_CHARS", "Bus", "Consumer", "Delivery", "Entry", "Handler", "Outgoing"]

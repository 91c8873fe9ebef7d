"""Apply the webhook inbox exactly once: claim, then one transaction per notification.

Relays claim received notifications like intents (``inbox_claim``: SKIP LOCKED, a lease
carried by ``available_at``, a fencing token) and commit the claim; each notification is
then applied in ONE transaction that first re-locks its row under the same token
(``inbox_take``; a lease that expired and was claimed again writes nothing), writes its
effects and marks it applied. A relay killed mid-apply rolls that transaction back; the
row is claimable again when the lease ends and is applied once by whoever claims it.

What applying means (Stripe's facts, :mod:`provider_adapters.stripe_webhooks`):

* :class:`PaymentSettled` for an intent whose outcome we do not know (``dead``, or
  ``pending`` a retry after an ambiguous reply): the notification's PaymentIntent is read
  exactly as the janitor's lookup reads it (``NotificationReader.settle``) and written
  through the relay's own fenced write-back (``Store.complete_in``: intent, payment,
  ledger, result event, promotion), so the janitor has nothing left to do. An intent in
  flight is left to its relay: the notification is looked at again after that lease. An
  intent already finished changes nothing, and the row says so.
* :class:`RefundsReported`: a refund we did not make (the provider's totals exceed what
  the payment and our own refunds in flight explain) is recorded: payment total and
  state, ledger posting, ``payment.refund.external`` event; when the payment's state
  cannot take it, a reconciliation exception instead. Totals at or below what the payment
  knows are an older or repeated notification: nothing changes, and the row says why.
* :class:`DisputeOpened`: the provider withdrew the disputed amount: the payment's
  ``disputed_minor`` and ``dispute_status`` (open), a ``dispute`` ledger posting
  (receivable to disputed, sql/0035), a ``dispute`` exception for an operator and a
  ``payment.dispute.opened`` event. An inquiry withdraws nothing: exception and event only.
* :class:`DisputeClosed`: won returns the funds (``dispute_reversal`` posting,
  ``payment.dispute.won``); lost leaves the posting as final (``payment.dispute.lost``).
  One dispute per payment: a duplicate or older notification changes nothing, and an
  outcome that overtakes its opening records the opening first.
* Near-real-time reconciliation: after a notification carrying totals is applied, the
  provider's captured and refunded totals are compared with the payment's ledger in the
  same transaction; a difference opens an ``amount_mismatch`` exception at once (unless
  an intent of the payment is still unresolved: its own write-back is the next change).
* :class:`Unhandled`: marked ``ignored`` with the reason, never an error.
"""

from relay.core.inbox.applier import InboxApplier
from relay.core.inbox.common import Applied, InboxOptions, refund_state
from relay.core.inbox.storage import purge_applied, store_notification

__all__ = [
    "Applied",
    "InboxApplier",
    "InboxOptions",
    "purge_applied",
    "refund_state",
    "store_notification",
]

//! The REST API: an HTTP/1.1 server on a Unix socket, on its own thread. It turns requests
//! into [`VmmAction`](crate::vmm::action::VmmAction)s for the vmm thread and writes back
//! what the vmm thread answers; it never touches VM state itself.

pub mod http;
pub mod router;
pub mod server;
pub mod socket;

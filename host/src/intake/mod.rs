//! The intakes: thin adapters from a protocol to an
//! [`Invocation`](crate::pipeline::Invocation) and back.

pub mod amqp;
pub mod http;

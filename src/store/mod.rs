//! etcd: the client, the reflector that mirrors a prefix, the decoding of the record
//! prefixes shared by the proxy and the DNS, service records' CRUD, and ingress routes' and
//! certificates' CRUD.

pub mod etcd;
pub mod ingress;
pub mod keys;
pub mod records;
pub mod services;

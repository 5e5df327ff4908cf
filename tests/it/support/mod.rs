pub mod apns;
pub mod fcm;
pub mod tls;
pub mod webpush;

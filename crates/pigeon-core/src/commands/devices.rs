//! `devices` and `revoke_device`: the caller's logged-in devices.

use pigeon_proto::{DeviceId, ReqId, ServerFrame};

use crate::{Caller, ChatService, Result};

pub(crate) async fn list(chat: &ChatService, caller: &Caller, id: ReqId) -> Result<ServerFrame> {
    Ok(ServerFrame::Devices {
        id,
        devices: chat.list_devices(caller).await?,
    })
}

pub(crate) async fn revoke(
    chat: &ChatService,
    caller: &Caller,
    id: ReqId,
    device_id: DeviceId,
) -> Result<ServerFrame> {
    chat.revoke_device(caller, device_id).await?;
    Ok(ServerFrame::Ok { id })
}

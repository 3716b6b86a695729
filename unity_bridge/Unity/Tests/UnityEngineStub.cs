// UnityEngineStub: declarations (no behaviour) of the UnityEngine types NpcVoiceSpeaker uses, to compile it outside Unity.
#if !UNITY_5_3_OR_NEWER
using System;

namespace UnityEngine
{
    public class Object { }

    public class Component : Object
    {
        public T GetComponent<T>() { throw new NotImplementedException(); }
    }

    public class Behaviour : Component { }

    public class MonoBehaviour : Behaviour { }

    public sealed class AudioClip : Object
    {
        public int frequency { get { throw new NotImplementedException(); } }
        public int channels { get { throw new NotImplementedException(); } }
        public int samples { get { throw new NotImplementedException(); } }
        public bool GetData(float[] data, int offsetSamples) { throw new NotImplementedException(); }
        public bool SetData(float[] data, int offsetSamples) { throw new NotImplementedException(); }
        public static AudioClip Create(string name, int lengthSamples, int channels, int frequency, bool stream)
        {
            throw new NotImplementedException();
        }
    }

    public sealed class AudioSource : Behaviour
    {
        public AudioClip clip { get; set; }
        public bool loop { get; set; }
        public void Play() { throw new NotImplementedException(); }
    }

    public static class AudioSettings
    {
        public static int outputSampleRate { get { throw new NotImplementedException(); } }
    }

    public static class Microphone
    {
        public static AudioClip Start(string deviceName, bool loop, int lengthSec, int frequency)
        {
            throw new NotImplementedException();
        }
        public static void End(string deviceName) { throw new NotImplementedException(); }
        public static int GetPosition(string deviceName) { throw new NotImplementedException(); }
    }

    public static class Debug
    {
        public static void Log(object message) { throw new NotImplementedException(); }
        public static void LogWarning(object message) { throw new NotImplementedException(); }
        public static void LogError(object message) { throw new NotImplementedException(); }
    }

    [AttributeUsage(AttributeTargets.Class, AllowMultiple = true)]
    public sealed class RequireComponent : Attribute
    {
        public RequireComponent(Type requiredComponent) { }
    }

    [AttributeUsage(AttributeTargets.Field)]
    public class PropertyAttribute : Attribute { }

    public sealed class HeaderAttribute : PropertyAttribute
    {
        public HeaderAttribute(string header) { }
    }

    public sealed class TooltipAttribute : PropertyAttribute
    {
        public TooltipAttribute(string tooltip) { }
    }
}

namespace UnityEngine.Events
{
    public abstract class UnityEventBase { }

    public abstract class UnityEvent<T0> : UnityEventBase
    {
        public void Invoke(T0 arg0) { throw new System.NotImplementedException(); }
    }

    public abstract class UnityEvent<T0, T1> : UnityEventBase
    {
        public void Invoke(T0 arg0, T1 arg1) { throw new System.NotImplementedException(); }
    }
}
#endif
